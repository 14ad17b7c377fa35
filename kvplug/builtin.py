"""kvplug's own strategy parts, registered through the public hook like any plugin."""

from __future__ import annotations

from kvplug.budgets.adakv import AdaKV
from kvplug.budgets.chunkkv import ChunkKV
from kvplug.budgets.pyramid import Pyramid
from kvplug.budgets.uniform import Uniform
from kvplug.codecs.fp8 import Fp8
from kvplug.codecs.integer import Int2, Int3, Int4, Int8
from kvplug.codecs.kivi import Kivi
from kvplug.codecs.mixed import Mixed
from kvplug.codecs.none import NoCodec
from kvplug.hookspecs import hookimpl
from kvplug.mergers.minicache import MiniCache
from kvplug.placements.infinigen import InfiniGen
from kvplug.scorers.attention_gate import AttentionGate
from kvplug.scorers.cake import Cake
from kvplug.scorers.compactor import Compactor
from kvplug.scorers.criticalkv import CriticalKV
from kvplug.scorers.curdkv import CurDKV
from kvplug.scorers.duo import DuoAttention
from kvplug.scorers.expected_attention import ExpectedAttention
from kvplug.scorers.h2o import H2O
from kvplug.scorers.keydiff import KeyDiff
from kvplug.scorers.knorm import KNorm
from kvplug.scorers.lagkv import LagKV
from kvplug.scorers.random import RandomScorer
from kvplug.scorers.scissorhands import Scissorhands
from kvplug.scorers.simlayerkv import SimLayerKV
from kvplug.scorers.snapkv import SnapKV
from kvplug.scorers.streaming import Streaming
from kvplug.scorers.tova import Tova


@hookimpl
def kvplug_parts() -> list[type]:
    return [NoCodec, Int8, Int4, Int3, Int2, Mixed, Kivi, Fp8,
            Streaming, H2O, SnapKV, Tova, KNorm, RandomScorer, SimLayerKV, ExpectedAttention, KeyDiff, LagKV, DuoAttention,
            CurDKV, CriticalKV, Cake, Scissorhands, Compactor, AttentionGate,
            Uniform, Pyramid, AdaKV, ChunkKV, MiniCache, InfiniGen]
