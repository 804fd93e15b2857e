"""Uni-3DAR model (decoder with masked next-token prediction), its sequences and its sampler."""

from threefold.science.uni3dar.model import Uni3DAR, Uni3DARConfig
from threefold.science.uni3dar.sampling import Generated, filter_best_fraction, generate
from threefold.science.uni3dar.sequence import SequenceBatch, build_sequences, drop_level1_nodes
