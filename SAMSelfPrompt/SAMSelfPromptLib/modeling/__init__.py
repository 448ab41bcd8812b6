"""Pure networks: the SAM-family backbones and their registry, the mask head, LoRA, the fast encoder copy."""
