"""The toy Janus recipe: ``python recipes/toy_janus/build_model.py --help``."""
