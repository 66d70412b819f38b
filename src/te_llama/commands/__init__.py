"""The ``te-llama`` commands other than ``bench``: finetune, eval, generate, convert, demo, and the embedded assets."""
