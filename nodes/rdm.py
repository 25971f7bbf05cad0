"""Retrieval-augmented diffusion model nodes ("Text-Guided Synthesis of Artistic Images with Retrieval-Augmented
Diffusion Models", RDM): the RDM Checkpoint Loader (MODEL + VAE that the stock samplers and VAE nodes use)
and the RDM Conditioning (CLIP text ⊕ k retrieved neighbours, as CompVis' knn2img builds it).

Thin nodes: the checks and the maths are ``rdm/``; the ComfyUI objects are built by ``host.rdm``.
"""
from ..common.folders import RDM as RDM_FOLDER
from ..host import folders
from ..host.models import load_file
from ..host.rdm import build
from ..rdm.checkpoint import WEIGHT_CHOICES, load_rdm
from ..rdm.conditioning import DEFAULT_K, IMAGE_USES, MODES, rdm_conditioning

CATEGORY = "atelier/rdm"
PAPER = "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented Diffusion Models"


class AtelierRDMCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (folders.files(RDM_FOLDER), {
                    "tooltip": "An RDM checkpoint in models/rdm: CompVis' LAION-RDM model.ckpt (latent-diffusion, "
                               "768×768) or a .safetensors conversion of it. Loaded with ComfyUI's safe loader: a "
                               "pickle that holds code is refused."}),
                "weights": (list(WEIGHT_CHOICES), {
                    "default": WEIGHT_CHOICES[0],
                    "tooltip": "ema: the EMA weights, which CompVis' knn2img samples with (the raw ones when the file "
                               "has none; the info says so). raw: the trained weights as saved."}),
            }
        }

    RETURN_TYPES = ("MODEL", "VAE", "STRING")
    RETURN_NAMES = ("model", "vae", "info")
    OUTPUT_TOOLTIPS = (
        "The RDM UNet (16-channel latents, context 768) for the stock KSampler, KSamplerAdvanced and "
        "SamplerCustomAdvanced.",
        "Its KL-f16 autoencoder for the stock VAE Decode / VAE Encode (one latent pixel per 16×16 image pixels).",
        "What was loaded: parameters, weights used, autoencoder, schedule.",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (f"Loads a retrieval-augmented diffusion model ('{PAPER}', Rombach, Blattmann, Ommer 2022): the "
                   "UNet as a MODEL, its KL-f16 autoencoder as a VAE. Condition it with RDM Conditioning; the "
                   "negative is ConditioningZeroOut of the positive. Other checkpoints are refused with what they are.")

    def load(self, ckpt_name, weights):
        return load_rdm(folders.full_path(RDM_FOLDER, ckpt_name), weights, load_file, build)


class AtelierRDMConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("ATELIER_CLIP", {"tooltip": "open_clip ViT-L-14 (OpenAI weights, 768-d), the RDM's text and "
                                                     "image embedder; the style database must hold its embeddings."}),
                "text": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompt (embedded with the CLIP "
                                                                                 "text tower, projected, L2-normalised)."}),
                "k": ("INT", {"default": DEFAULT_K, "min": 1, "max": 100, "tooltip": "Neighbours in the context, best "
                                                                                     "first (19 in the paper)."}),
                "mode": (list(MODES), {"default": MODES[0], "tooltip": "text + neighbours: the paper's context "
                                       "(text first). text only: the text token alone (no database). neighbours "
                                       "only: the k image embeddings alone."}),
                "text_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "Factor on the text token (1.0 = as in knn2img)."}),
                "image_use": (list(IMAGE_USES), {"default": IMAGE_USES[0], "tooltip": "With an image prompt: replace "
                              "text puts its CLIP image embedding where the text token was; beside text adds it "
                              "after the text token."}),
            },
            "optional": {
                "neighbors": ("ATELIER_NEIGHBORS", {"tooltip": "The Style Retriever's neighbours (needed unless mode "
                                                               "is text only)."}),
                "image": ("IMAGE", {"tooltip": "Optional image prompt (the batch's CLIP image embeddings averaged)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "info")
    OUTPUT_TOOLTIPS = ("The RDM context (1, k+1, 768) as CONDITIONING; its ConditioningZeroOut is the negative.",
                       "The context's shape and what is in it.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (f"Builds the conditioning of '{PAPER}' as CompVis' knn2img does: the L2-normalised CLIP text "
                   "embedding followed by the k retrieved neighbours' L2-normalised CLIP image embeddings, "
                   "(1, k+1, 768). Use ConditioningZeroOut of it as the negative (knn2img's zeros).")

    def encode(self, clip, text, k, mode, text_weight, image_use, neighbors=None, image=None):
        context, info = rdm_conditioning(clip, text, neighbors, k, mode, text_weight, image, image_use)
        return ([[context, {}]], info)


NODE_CLASS_MAPPINGS = {
    "AtelierRDMCheckpointLoader": AtelierRDMCheckpointLoader,
    "AtelierRDMConditioning": AtelierRDMConditioning,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierRDMCheckpointLoader": "RDM Checkpoint Loader (Atelier)",
    "AtelierRDMConditioning": "RDM Conditioning (Atelier)",
}
