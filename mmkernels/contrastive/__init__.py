"""Contrastive losses (CLIP InfoNCE, SigLIP) that never materialize the B×B logits."""
