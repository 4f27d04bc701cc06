"""What the scripts at the top level share: small modules, one job each.

The scripts import these modules (`from support import checkpointing`); the modules
import each other relatively and never import a script (gpt.py, the model, aside).
Nothing is imported here, so that a script's `--help` loads only what it asks for.
"""
