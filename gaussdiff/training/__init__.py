"""Training: `gaussdiff train` and `gaussdiff train-classifier`.

- trainer.py: the training loop (`Trainer`, `DEFAULTS`, EMA, AdamW, resume, logging)
- evaluation.py: sample quality during training (`--eval-every`)
- checkpoint.py: crash-safe checkpoint directories with checksummed manifests
- precision.py: mixed precision (fp16 with dynamic loss scaling, bf16) and fp32
- guard.py: the NaN/inf guard of the training loop
- presets.py: named training presets (the papers' settings and small CPU ones)
- batch_size.py: choosing a batch size by measured throughput (`sample --batch-size auto`)
- classifier.py: noisy classifiers for classifier guidance: training (`ClassifierTrainer`) and
  loading (`load_classifier`, `NoisyClassifier`)
"""
