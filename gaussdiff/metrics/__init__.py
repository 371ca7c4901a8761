"""Sample-quality and likelihood metrics.

- frechet.py: feature_statistics, frechet_distance (FID / sFID / fd_<net>)
- kid.py: kernel_distance (KID), mmd2_unbiased
- precision_recall.py: precision_recall (Kynkäänniemi et al., k = 3)
- inception_score.py: inception_score
- inception.py: the verified Inception-V3 feature extractor (pool_3 and sFID spatial features)
- classifier.py: a small classifier trained on the data, for fd_<name> / is_<name>
- evaluate.py: `gaussdiff eval` with cached reference statistics
- likelihood.py: `gaussdiff nll`, the VLB in bits/dim with its terms
"""
from .frechet import feature_statistics, frechet_distance, trace_sqrt_product  # noqa: F401
from .inception_score import inception_score  # noqa: F401
from .kid import kernel_distance, mmd2_unbiased  # noqa: F401
from .precision_recall import knn_radii, precision_recall  # noqa: F401
