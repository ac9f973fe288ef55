"""Named model sizes. `vitb` is the paper's model; `tiny` trains in minutes on a laptop CPU."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Paper / released checkpoint: ViT-B encoders (11 + 1 joint), 512-wide 8-block decoder, 4.16-s windows.
    "vitb": dict(
        image_size=224,
        audio_length=416,
        embed_dim=768,
        num_heads=12,
        encoder_depth=11,
        joint_depth=1,
        decoder_dim=512,
        decoder_depth=8,
        decoder_heads=16,
        num_registers=8,
    ),
    # Same architecture, small enough for CPU tests and the demo: 96-px frames (36 patches),
    # 1.92-s windows (8 x 12 = 96 audio patches), 128 wide.
    "tiny": dict(
        image_size=96,
        audio_length=192,
        embed_dim=128,
        num_heads=4,
        encoder_depth=3,
        joint_depth=1,
        decoder_dim=64,
        decoder_depth=1,
        decoder_heads=4,
        num_registers=4,
    ),
}
