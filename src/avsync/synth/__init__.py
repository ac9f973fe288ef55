"""`avsync synth`: synthetic audio-visual clips with a learnable correspondence and full ground truth.

Each clip is a sequence of events; each class is a visual object and a distinct sound, and the frames
show the object whose sound is playing. Modules: `classes` (what each class looks and sounds like),
`timeline` (events of a clip), `render` (frames and sounds), `mp4` (H.264 + AAC writing), `clip` (one
clip and its annotations), `config` (parameters), `generate` (the set, its tables, caching, the CLI).
"""

from avsync.synth.generate import (
    SPLITS,
    SynthManifest,
    load_synth,
    run_synth,
    synthesize,
    synthesize_config,
)

__all__ = ["SPLITS", "SynthManifest", "load_synth", "run_synth", "synthesize", "synthesize_config"]
