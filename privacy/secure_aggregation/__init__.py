"""Secure aggregation by pairwise masking (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020): the maths.

The server learns only the SUM of the sites' weighted updates. Each site encodes its update in fixed point modulo
2^32 (:mod:`.fixed_point`), adds a pseudo-random mask per pair of sites (one adds, the other subtracts: the pair's
masks cancel in the sum; keys from X25519 agreement, :mod:`.keys`, streams from :mod:`.masks`) and a self-mask of
its own, and secret-shares (:mod:`.shamir`) its mask key and self-mask seed with threshold ``t`` so the sum can be
unmasked when sites drop out after masking. :mod:`.protocol` composes them into a site side and a server side, with
no NVFlare in sight (the NVFlare components are in ``nvflare_jobs.secure_aggregation``).
"""

from privacy.secure_aggregation.fixed_point import DEFAULT_FRAC_BITS, FixedPointOverflowError, decode_sum, encode
from privacy.secure_aggregation.protocol import (
    Params,
    ProtocolError,
    ServerSession,
    SiteSession,
    ThresholdError,
)

__all__ = [
    "DEFAULT_FRAC_BITS",
    "FixedPointOverflowError",
    "Params",
    "ProtocolError",
    "ServerSession",
    "SiteSession",
    "ThresholdError",
    "decode_sum",
    "encode",
]
