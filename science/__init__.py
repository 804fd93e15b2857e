"""Science: Uni-3DAR octree tokenization of molecules, crystals and proteins, and its model.

``from threefold.science import OctreeTokenizer`` gives the tokenizer with its exact inverse; the
model (``threefold.science.uni3dar``) needs only torch.
"""

from threefold.science.octree import (
    PRESETS,
    CollisionError,
    CrystalTokens,
    OctreeSpec,
    OctreeTokenizer,
    OctreeTokens,
    detokenize,
    tokenize,
    tokenize_batch,
)
from threefold.science.vocab import Vocabulary
