"""Retrieval necks: modules that turn a backbone feature map T (N, C, H, W) into embeddings.

The same-style retrieval method (docs/METHODS.md) pools the map in several ways; each way is a
registered neck (:mod:`.base` has the interface and the registry; every other module of this
package is one neck and registers itself):

* ``gap`` (:class:`GAPNeck`) - global average pooling (the baseline).
* ``local_alignment`` (:class:`LocalAlignmentNeck`; old name ``lan``) - K branches of spatial +
  channel (SE) attention.
* ``stripes`` (:class:`StripeNeck`) - multi-granularity horizontal / vertical stripes, MGN style.
* ``rings`` (:class:`RingNeck`) - concentric square rings, invariant to 90/180 degree rotation.
* ``multi`` (:class:`MultiNeck`) - several necks on one map, embeddings concatenated.

No library ships these heads, so the attention branches, the stripe split and the ring masks are
hand-written from the method's description (marked "hand-written"); everything else is plain
torch (pooling, Linear, BatchNorm).
"""

from fashionlens.models.necks.base import NECKS, Neck, build_neck, canonical_neck
from fashionlens.models.necks.gap import GAPNeck
from fashionlens.models.necks.local_alignment import LocalAlignmentNeck
from fashionlens.models.necks.multi import MultiNeck
from fashionlens.models.necks.rings import RingNeck, ring_index
from fashionlens.models.necks.stripes import StripeNeck

__all__ = ["NECKS", "GAPNeck", "LocalAlignmentNeck", "MultiNeck", "Neck", "RingNeck", "StripeNeck", "build_neck",
           "canonical_neck", "ring_index"]
