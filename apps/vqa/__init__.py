"""The sample VQA app: Sort-of-CLEVR scenes, a cross-attention fuser, its recipe."""
