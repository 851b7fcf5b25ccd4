"""Lightning wiring for SEED (DESIGN §5): three stages, each exporting a tokenizer file for the next.

stage 1  stage1.SEEDStage1Module            image-text contrastive: last causal query vs text [CLS]
                                            -> seed_stage1.safetensors (+ the caption tokenizer beside it)
stage 2  stage2.SEEDStage2Module            encoder + Q-Former frozen; 5 L_vq + 2 L_rec + 0.5 L_gen
                                            -> seed_stage2.safetensors
detok    detokenizer.SEEDDetokenizerModule  diffusion UNet conditioned on decode_embedding(encode(x))
                                            -> seed.safetensors
data.py holds the image-caption data module of stage 1, losses.py the contrastive loss (negatives gathered
across processes under DDP). Then the SEED-LLaMA LM trains with the ordinary ImageTextDataModule +
MultimodalLMModule on the exported file. Every stage derives from train.tokenizer_module.TokenizerTrainingModule.
"""
from .data import ImageCaptionDataModule, ImageCaptionDataset, tokenizer_json_path
from .detokenizer import SEEDDetokenizerModule
from .losses import contrastive_loss, gather_with_grad
from .stage1 import SEEDStage1Module
from .stage2 import SEEDStage2Module

__all__ = ["ImageCaptionDataModule", "ImageCaptionDataset", "SEEDDetokenizerModule", "SEEDStage1Module",
           "SEEDStage2Module", "contrastive_loss", "gather_with_grad", "tokenizer_json_path"]
