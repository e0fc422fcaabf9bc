"""Checkpoint readers and writers: Hugging Face safetensors (``safetensors_io``), the HF <-> our name map
(``hf_layout``) and our converted orbax format (``orbax_io``). The CLIs that use them are in ``checkpoints_tools``."""
