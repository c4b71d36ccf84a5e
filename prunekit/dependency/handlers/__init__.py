"""prunekit's rules, one file per kind of op; importing this package registers them.

=====================  ===============================================================
file                   ops
=====================  ===============================================================
``conv.py``            ``nn.Conv2d`` (grouped and depthwise too)
``conv_transpose.py``  ``nn.ConvTranspose2d`` (``groups=1``)
``linear.py``          ``nn.Linear``
``batchnorm.py``       ``nn.BatchNorm2d``
``layer_norm.py``      ``nn.LayerNorm`` on channels-last features, torchvision's ``LayerNorm2d``
``prelu.py``           ``nn.PReLU`` (one slope, or one per channel)
``elementwise.py``     activations, arithmetic (residual additions, gates, layer scale), dropout, stochastic depth
``permute.py``         ``permute`` to channels-last and back
``pooling.py``         pooling, resampling, padding, the spatial mean by hand
``flatten.py``         flatten (and ``view``/``reshape`` to [N, -1]) into an ``nn.Linear``
``cat.py``             ``torch.cat`` along the channels
``indexing.py``        indexing and fixed-size splits (refused), an attention's output item
``attention.py``       ``nn.MultiheadAttention`` (self-attention): whole heads
=====================  ===============================================================
"""

from prunekit.dependency.handlers import (  # noqa: F401  (each registers its handlers)
    attention,
    batchnorm,
    cat,
    conv,
    conv_transpose,
    elementwise,
    flatten,
    indexing,
    layer_norm,
    linear,
    permute,
    pooling,
    prelu,
)
