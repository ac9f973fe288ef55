"""Search over a gallery of embedded clips with FAISS (`avsync index`; guide: docs/search.md).

- `gallery`: the clips, read in place from `avsync embed` output (memory-mapped npz parts).
- `vectors`: a clip as one unit vector whose inner product is the diagonal-mean similarity.
- `compressed`: the compressed index (PCA, 4-bit scan, 8-bit re-scoring) for millions of clips.
- `index`: building an index directory (one FAISS index per modality), opening and searching it.
- `queries`: query tokens from a clip id, an audio file or a video file.
- `synthetic`: a clustered synthetic gallery of any size, regenerable chunk by chunk (benchmarks, tests).
- `commands`: the `avsync index build` / `avsync index search` command.
"""

from avsync.search.compressed import CompressedSettings
from avsync.search.gallery import Gallery, GalleryError
from avsync.search.index import Hits, SearchError, SearchIndex, build_index

__all__ = [
    "CompressedSettings",
    "Gallery",
    "GalleryError",
    "Hits",
    "SearchError",
    "SearchIndex",
    "build_index",
]
