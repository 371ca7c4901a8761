"""`gaussdiff serve MODEL [MODEL ...]`: the local web playground (gaussdiff.serve)."""
from __future__ import annotations

import importlib.util
import sys

from ..errors import UsageError
from ..training.classifier import load_classifier
from ..serve.playground import Limits, Playground


def add_serve_parser(sub):
    p = sub.add_parser("serve", help="a local web playground for the models named here",
                       description="Serve a page on which to pick a model, sampler, steps, seed, "
                                   "class, guidance scale and temperature, watch the x̂0 estimate "
                                   "sharpen while it samples, and download the PNG and .npz. Only "
                                   "the models named here are served, one request at a time, with "
                                   "a bounded queue (needs the serve extra: starlette, uvicorn).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories, served by their base name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--classifier", metavar="DIR", help="a noisy classifier for classifier guidance "
                                                      "of the models without a null label")
    p.add_argument("--max-nfe", type=int, default=Limits.max_nfe,
                   help=f"network evaluations per image a request may ask ({Limits.max_nfe})")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help=f"images per request ({Limits.max_images})")
    p.add_argument("--max-queue", type=int, default=Limits.max_queue,
                   help=f"requests waiting or running; more get HTTP 503 ({Limits.max_queue})")
    p.add_argument("--device")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    for flag in ("max_nfe", "max_images", "max_queue"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: a port number in [0, 65535]")
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs {' and '.join(missing)}: pip install 'gaussdiff[serve]'")
    classifier = load_classifier(args.classifier, device=args.device) if args.classifier else None
    playground = Playground(args.models, device=args.device, classifier=classifier,
                            limits=Limits(max_nfe=args.max_nfe, max_images=args.max_images,
                                          max_queue=args.max_queue))
    import uvicorn   # lazy: optional (the serve extra)
    from ..serve.app import make_app   # lazy: imports starlette (the serve extra)
    print(f"serving {', '.join(playground.models)} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(make_app(playground), host=args.host, port=args.port, log_level="warning")
