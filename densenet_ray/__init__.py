"""densenet_ray: DenseNet-BC (Huang et al., CVPR 2017) trained data-parallel on Ray.

    python -m densenet_ray.model            # the model zoo: params and GMACs
"""

__version__ = "0.1.0"
