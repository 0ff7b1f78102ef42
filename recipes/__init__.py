"""Training recipes beside the library (torchtune-style): scripts that build or train models, run as
``python recipes/<name>/<script>.py``; the library never imports them."""
