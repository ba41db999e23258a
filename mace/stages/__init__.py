"""The paper's steps: data preparation, closed-form refinement (stage 1), per-concept LoRA
training (stage 2), closed-form fusion (stage 3), and the preservation statistics they share."""
