"""Tiny stand-ins for the CLIP-guidance tests: open_clip with random weights behind a test-local adapter
that has the ATELIER_CLIP methods (COMMON.md contract), a toy differentiable decoder and an analytic
denoiser. Everything is built inside ``torch.inference_mode()`` as ComfyUI would."""
import torch
import torch.nn.functional as F

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class TinyClip:
    """Test-local ATELIER_CLIP: same attributes and methods as retrieval.embedder's object."""

    name = "tiny-ViT"
    weights_hash = "random"

    def __init__(self, seed=0, image_size=32):
        import open_clip
        from open_clip.model import CLIP

        torch.manual_seed(seed)
        self.model = CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=image_size, layers=2, width=32, patch_size=8, head_width=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        ).eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        self.dim, self.image_size, self.device = 32, image_size, torch.device("cpu")

    def encode_text(self, texts):
        with torch.no_grad():
            return F.normalize(self.model.encode_text(self.tokenizer(list(texts))).float(), dim=-1)

    def embed_pixels(self, pixels):
        x = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        m = torch.tensor(MEAN).view(1, 3, 1, 1)
        s = torch.tensor(STD).view(1, 3, 1, 1)
        return self.model.encode_image((x - m) / s)

    def encode_image(self, pixels):
        with torch.no_grad():
            return F.normalize(self.embed_pixels(pixels).float(), dim=-1)


class ToyDecoder(torch.nn.Module):
    """Latent [B,4,h,w] -> pixels [B,3,4h,4w] in about [-1.3, 1.3]: differentiable and cheap."""

    def __init__(self, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, z):
        h = F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
        return 1.3 * torch.tanh(self.out(F.gelu(self.conv(h))))


def gaussian_denoiser(s=1.0):
    """Exact denoiser for data ~ N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2)."""

    def model(x, sigma, **extra):
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x * s * s / (s * s + sig * sig)

    return model


def sample_euler(model, x, sigmas):
    """Deterministic Euler (= DDIM) in sigma space, the k-diffusion way."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i] * x.new_ones(x.shape[0])
        denoised = model(x, s)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def karras_sigmas(n, sigma_min=0.05, sigma_max=10.0, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])
