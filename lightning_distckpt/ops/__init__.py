"""Operations on committed checkpoints outside training: export to plain files (torch, safetensors)."""
