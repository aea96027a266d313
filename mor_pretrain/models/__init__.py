from mor_pretrain.models.mor import ModelArgs, ModelOutput, MoRModel

__all__ = ["ModelArgs", "ModelOutput", "MoRModel"]
