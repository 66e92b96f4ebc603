"""The one LoRA trainer (trainer.py: accelerate, resume, diffusers format) and the LoRA bank
(bank.py: index, load once, switch adapters), shared by every method that trains LoRAs.
Import from the submodules: the bank and the file layout (files.py) do not import torch."""
