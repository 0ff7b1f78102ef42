"""The toy Janus recipe: ``python recipes/toy_janus/build_model.py --help`` (the command line; its docstring maps the
modules beside it), and ``probes/``, the research probes of the built model."""
