"""The two ends of one secure-aggregation job: :class:`SiteSession` (one per site) and :class:`ServerSession`.

Messages are plain dicts of strings (hex) and NumPy arrays, so any transport can carry them (NVFlare here, direct
calls in the tests and benchmark). Per job, then per round::

    setup    site -> server  public key (X25519), checked against the site's authenticated identity
             server -> sites the key table; each site returns Shamir shares of its private key, each encrypted for
                             one peer (AES-GCM under a key only that pair can derive), and key-confirmation tags
             server -> sites the tags; each site checks its peers' tags (a tampered table fails here) and the
                             transcript hash of the table (a table that differs between sites fails here)
    round r  site -> server  y_u = enc(w_u·Δ_u, w_u) + PRG(b_u) + Σ_{v>u} PRG(k_uv,r) − Σ_{v<u} PRG(k_uv,r)  (mod 2^32)
                             and Shamir shares of its fresh self-mask seed b_u, encrypted per peer
             server -> survivors S (masked inputs received) and dropped D = participants − S; each survivor returns
                             its shares of b_u for u ∈ S and of the private key of u ∈ D, never both for one u
             server          Σ_S y_u − Σ_S PRG(b_u) − (pairwise masks between S and D) = Σ_S enc(w_u·Δ_u, w_u)

What the server learns: Σ w_u·Δ_u and Σ w_u over the survivors, nothing about one site's Δ_u unless ``t`` sites
collude with it (see docs/secure_aggregation.md). A site whose private key was reconstructed (it dropped) is out
of the rest of the job: its pairwise masks are known to the server from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.secure_aggregation import keys as kx
from privacy.secure_aggregation import shamir
from privacy.secure_aggregation.fixed_point import DEFAULT_FRAC_BITS, check_frac_bits, decode_sum, encode
from privacy.secure_aggregation.masks import pair_seed, self_seed, stream

WEIGHT_KEY = "__secagg_weight__"  # the site's aggregation weight, masked like every weight of the update


class ProtocolError(RuntimeError):
    """A message that breaks the protocol (missing or tampered key, wrong round, inconsistent sets): fail closed."""


class ThresholdError(ProtocolError):
    """Fewer sites than the threshold remain: the round's aggregate cannot (and must not) be unmasked."""


@dataclass(frozen=True)
class Params:
    """What every party must agree on: the job, its sites, the threshold ``t`` and the fixed-point precision.

    ``t`` must be a strict majority of the sites (``n // 2 < t <= n``): with less, two disjoint groups of survivors
    could each be asked for different shares of the same site. It is also the fewest sites a round can unmask with.
    """

    job_id: str
    sites: tuple[str, ...]
    threshold: int
    frac_bits: int = DEFAULT_FRAC_BITS

    def __post_init__(self) -> None:
        check_params(self.sites, self.threshold, self.frac_bits)
        object.__setattr__(self, "sites", tuple(sorted(self.sites)))

    def as_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "threshold": self.threshold, "frac_bits": self.frac_bits}


def check_params(sites: Iterable[str], threshold: Any, frac_bits: Any = DEFAULT_FRAC_BITS) -> None:
    """Raise ``ValueError`` for fewer than 2 sites, duplicates, or a threshold outside ``(n/2, n]``."""
    sites = list(sites)
    if len(sites) < 2 or len(set(sites)) != len(sites) or not all(isinstance(s, str) and s for s in sites):
        raise ValueError(f"secure aggregation needs at least 2 distinct site names, got {sites!r}")
    n = len(sites)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"threshold must be an integer, got {threshold!r}")
    if threshold > n:
        raise ValueError(f"threshold {threshold} is above the {n} sites: no round could ever be unmasked")
    if threshold <= n // 2:
        raise ValueError(
            f"threshold {threshold} must be a strict majority of the {n} sites (> {n // 2}): with fewer, the server "
            "could obtain both the self-mask and the key shares of one site from two disjoint groups"
        )
    check_frac_bits(frac_bits)


def _layout(update: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(np.shape(update[k]))) for k in sorted(update)]


def _flatten(update: Mapping[str, Any]) -> np.ndarray:
    parts = [np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _pair_sign(u: str, v: str) -> int:
    return 1 if u < v else -1


class _Pairwise:
    """Keys one site derives with one peer from their X25519 shared secret and the transcript."""

    def __init__(self, shared: bytes, transcript: bytes) -> None:
        self.shared = shared
        self.enc = kx.derive(shared, salt=transcript, info="fetalfl-secagg|share-encryption")
        self.confirm = kx.derive(shared, salt=transcript, info="fetalfl-secagg|key-confirmation")


class SiteSession:
    """A site's side: its key pair (never leaves the site), the agreed table, and each round's self-mask seed."""

    def __init__(self, site: str, params: Params) -> None:
        if site not in params.sites:
            raise ProtocolError(f"{site!r} is not one of the job's sites {list(params.sites)}")
        self.site = site
        self.params = params
        self._private = kx.new_private_key()
        self.public_key = kx.public_bytes(self._private)
        self.table: dict[str, bytes] | None = None
        self.transcript: bytes | None = None
        self.confirmed = False
        self._pairs: dict[str, _Pairwise] = {}
        self.revealed: set[str] = set()  # sites whose private key this site helped reconstruct
        self._rounds: dict[int, dict[str, Any]] = {}

    # -- setup -------------------------------------------------------------------------------------------------
    def advertise(self) -> dict[str, str]:
        return {"site": self.site, "public_key": self.public_key.hex()}

    def setup(self, table: Mapping[str, str]) -> dict[str, Any]:
        """Check the key table the server sent, derive the pairwise keys, and secret-share the private key."""
        p = self.params
        if not isinstance(table, Mapping):
            raise ProtocolError("the key table is not a mapping")
        unknown = sorted(set(table) - set(p.sites))
        if unknown:
            raise ProtocolError(f"the key table names sites outside the job: {unknown}")
        if len(table) < p.threshold:
            raise ThresholdError(
                f"only {len(table)} site(s) have keys {sorted(table)}, below the threshold {p.threshold}"
            )
        if self.site not in table:
            raise ProtocolError(f"the key table has no key for this site ({self.site})")
        try:
            parsed = {s: bytes.fromhex(str(h)) for s, h in table.items()}
        except ValueError:
            raise ProtocolError("a public key in the table is not hex") from None
        if parsed[self.site] != self.public_key:
            raise ProtocolError(f"the key table carries a different public key for this site ({self.site}): tampered")
        self.table = dict(sorted(parsed.items()))
        self.transcript = kx.transcript_hash(p.job_id, p.as_dict(), self.table)
        try:
            self._pairs = {
                v: _Pairwise(kx.agree(self._private, pk), self.transcript)
                for v, pk in self.table.items()
                if v != self.site
            }
        except kx.KeyMaterialError as e:
            raise ProtocolError(f"a peer's public key is unusable: {e}") from None
        members = list(self.table)
        shares = shamir.split(kx.private_bytes(self._private), len(members), p.threshold)
        key_shares, tags = {}, {}
        for (x, y), v in zip(shares, members):
            if v == self.site:
                continue  # the site's own share is useless to it: it knows its key
            aad = f"{p.job_id}|key-share|{self.site}|{v}|{x}"
            key_shares[v] = kx.encrypt(self._pairs[v].enc, shamir.share_to_bytes(y), aad).hex()
            tags[v] = kx.tag(self._pairs[v].confirm, self._confirm_message(self.site, v)).hex()
        return {"site": self.site, "transcript": self.transcript.hex(), "key_shares": key_shares, "tags": tags}

    def _confirm_message(self, sender: str, receiver: str) -> str:
        assert self.transcript is not None
        return f"{self.params.job_id}|confirm|{sender}|{receiver}|{self.transcript.hex()}"

    def confirm(self, transcript: str, tags_for_me: Mapping[str, str]) -> None:
        """Check every peer derived the same pairwise key from the same table (raises :class:`ProtocolError`)."""
        if self.transcript is None or self.table is None:
            raise ProtocolError("confirm() before setup()")
        if transcript != self.transcript.hex():
            raise ProtocolError("the sites do not share one key table (transcript hashes differ): tampered keys")
        missing = sorted(set(self._pairs) - set(tags_for_me))
        if missing:
            raise ProtocolError(f"no key confirmation from {missing}")
        for u, pair in self._pairs.items():
            try:
                given = bytes.fromhex(str(tags_for_me[u]))
            except ValueError:
                raise ProtocolError(f"malformed key confirmation from {u}") from None
            if not kx.tags_equal(given, kx.tag(pair.confirm, self._confirm_message(u, self.site))):
                raise ProtocolError(f"the key confirmation from {u} does not verify: its view of the keys differs")
        self.confirmed = True

    # -- one round ---------------------------------------------------------------------------------------------
    def mask(self, rnd: int, update: Mapping[str, Any], weight: float, participants: Iterable[str]) -> dict[str, Any]:
        """The masked, fixed-point ``weight·update`` (plus ``weight`` itself) and the encrypted self-mask shares."""
        p = self.params
        if not self.confirmed or self.table is None or self.transcript is None:
            raise ProtocolError("mask() before the key table was confirmed")
        parts = sorted(set(participants))
        self._check_participants(rnd, parts)
        if rnd in self._rounds:
            raise ProtocolError(f"round {rnd} was already masked by this site (a second input would leak the first)")
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if not update or WEIGHT_KEY in update:
            raise ValueError(f"the update must be non-empty and must not use the reserved key {WEIGHT_KEY!r}")
        vector = np.concatenate([_flatten(update) * float(weight), [float(weight)]])
        masked = encode(vector, frac_bits=p.frac_bits, n_summands=len(parts))
        seed = os.urandom(32)
        masked += stream(self_seed(seed, job_id=p.job_id, rnd=rnd), masked.size)
        for v in parts:
            if v == self.site:
                continue
            prg = stream(
                pair_seed(self._pairs[v].shared, transcript=self.transcript, job_id=p.job_id, rnd=rnd), masked.size
            )
            if _pair_sign(self.site, v) > 0:
                masked += prg
            else:
                masked -= prg
        members = list(self.table)
        shares = dict(zip(members, shamir.split(seed, len(members), p.threshold)))
        self_shares = {}
        for v in parts:
            if v == self.site:
                continue
            x, y = shares[v]
            aad = f"{p.job_id}|self-share|{rnd}|{self.site}|{v}|{x}"
            self_shares[v] = kx.encrypt(self._pairs[v].enc, shamir.share_to_bytes(y), aad).hex()
        # the site's own share of its seed goes to the server only at unmask time, once it is listed as a survivor
        self._rounds[rnd] = {
            "participants": parts,
            "answered": None,
            "own": shamir.share_to_bytes(shares[self.site][1]),
        }
        out: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape in _layout(update):
            size = int(np.prod(shape, dtype=np.int64))
            out[key] = masked[offset : offset + size].reshape(shape)
            offset += size
        out[WEIGHT_KEY] = masked[offset:]
        return {
            "masked": out,
            "self_shares": self_shares,
            "self_commit": hashlib.sha256(seed).hexdigest(),
        }

    def _check_participants(self, rnd: int, parts: list[str]) -> None:
        assert self.table is not None
        outside = sorted(set(parts) - set(self.table))
        if outside:
            raise ProtocolError(f"round {rnd}: participants {outside} have no key in the agreed table")
        if self.site not in parts:
            raise ProtocolError(f"round {rnd}: this site is not among the participants {parts}")
        if len(parts) < self.params.threshold:
            raise ThresholdError(
                f"round {rnd}: {len(parts)} participant(s), below the threshold {self.params.threshold}"
            )
        again = sorted(set(parts) & self.revealed)
        if again:
            raise ProtocolError(
                f"round {rnd}: {again} had their private key reconstructed in an earlier round; masking with them "
                "again would protect nothing"
            )

    def unmask(
        self,
        rnd: int,
        survivors: Iterable[str],
        dropped: Iterable[str],
        self_shares: Mapping[str, str],
        key_shares: Mapping[str, str],
    ) -> dict[str, dict[str, str]]:
        """This site's shares for the server: of ``b_u`` for each survivor u, of ``sk_u`` for each dropped u."""
        p = self.params
        state = self._rounds.get(rnd)
        if state is None:
            raise ProtocolError(f"round {rnd}: this site sent no masked input, so it gives no shares")
        S, D = sorted(set(survivors)), sorted(set(dropped))
        if set(S) & set(D):
            raise ProtocolError(f"round {rnd}: {sorted(set(S) & set(D))} listed as both survived and dropped")
        if sorted(set(S) | set(D)) != state["participants"]:
            raise ProtocolError(f"round {rnd}: survivors + dropped do not make the round's participants")
        if self.site not in S:
            raise ProtocolError(f"round {rnd}: this site is not listed as a survivor")
        if len(S) < p.threshold:
            raise ThresholdError(f"round {rnd}: {len(S)} survivor(s), below the threshold {p.threshold}")
        if state["answered"] is not None and state["answered"] != (S, D):
            raise ProtocolError(f"round {rnd}: asked again with different survivors: refused")
        assert self.table is not None
        members = list(self.table)
        x_of = {s: i + 1 for i, s in enumerate(members)}
        out: dict[str, dict[str, str]] = {"self": {}, "key": {}}
        for u in S:
            if u == self.site:
                out["self"][u] = state["own"].hex()
                continue
            if u not in self_shares:
                raise ProtocolError(f"round {rnd}: no self-mask share of survivor {u} for this site")
            aad = f"{p.job_id}|self-share|{rnd}|{u}|{self.site}|{x_of[self.site]}"
            out["self"][u] = kx.decrypt(self._pairs[u].enc, bytes.fromhex(self_shares[u]), aad).hex()
        for u in D:
            if u not in key_shares:
                raise ProtocolError(f"round {rnd}: no key share of dropped site {u} for this site")
            aad = f"{p.job_id}|key-share|{u}|{self.site}|{x_of[self.site]}"
            out["key"][u] = kx.decrypt(self._pairs[u].enc, bytes.fromhex(key_shares[u]), aad).hex()
        state["answered"] = (S, D)
        self.revealed.update(D)
        return out


class ServerSession:
    """The server's side: routes keys and shares, sums masked inputs modulo 2^32, unmasks only the sum."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.table: dict[str, bytes] = {}
        self.transcript: str | None = None
        self._key_shares: dict[str, dict[str, str]] = {}  # receiver -> sender -> ciphertext
        self._tags: dict[str, dict[str, str]] = {}  # receiver -> sender -> tag
        self.revealed: set[str] = set()
        self._round: dict[str, Any] | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def add_public_key(self, message: Mapping[str, Any], *, authenticated_site: str) -> None:
        """A site's public key; ``authenticated_site`` is who the transport says sent it (its identity)."""
        site = message.get("site")
        if site != authenticated_site:
            raise ProtocolError(f"a key claims to be from {site!r} but came from {authenticated_site!r}: refused")
        if site not in self.params.sites:
            raise ProtocolError(f"{site!r} is not one of the job's sites")
        if site in self.table:
            raise ProtocolError(f"{site} sent a second public key")
        try:
            key = bytes.fromhex(str(message.get("public_key")))
        except ValueError:
            raise ProtocolError(f"{site}'s public key is not hex") from None
        if len(key) != kx.PUBLIC_KEY_BYTES:
            raise ProtocolError(f"{site}'s public key is not {kx.PUBLIC_KEY_BYTES} bytes")
        self.table[site] = key

    def key_table(self) -> dict[str, str]:
        if len(self.table) < self.params.threshold:
            raise ThresholdError(
                f"only {len(self.table)} site(s) sent keys {sorted(self.table)}, below the threshold "
                f"{self.params.threshold}"
            )
        return {s: k.hex() for s, k in sorted(self.table.items())}

    def add_setup(self, message: Mapping[str, Any], *, authenticated_site: str) -> None:
        site = message.get("site")
        if site != authenticated_site or site not in self.table:
            raise ProtocolError(f"setup message from {authenticated_site!r} claims {site!r}")
        transcript = message.get("transcript")
        if self.transcript is None:
            self.transcript = transcript
        elif transcript != self.transcript:
            raise ProtocolError(f"{site} saw a different key table than the other sites: refused")
        for v, ct in dict(message.get("key_shares") or {}).items():
            self._key_shares.setdefault(v, {})[site] = ct
        for v, tg in dict(message.get("tags") or {}).items():
            self._tags.setdefault(v, {})[site] = tg

    def confirmation(self) -> dict[str, Any]:
        """What the sites check before their first masked input (the transcript and each pair's tags)."""
        if self.transcript is None:
            raise ProtocolError("no setup message was received")
        return {"transcript": self.transcript, "tags": {v: dict(t) for v, t in self._tags.items()}}

    def participants(self) -> list[str]:
        """Sites that may mask this round: those with keys, minus those whose key was reconstructed."""
        return sorted(set(self.table) - self.revealed)

    # -- one round ---------------------------------------------------------------------------------------------
    def start_round(self, rnd: int, participants: Iterable[str]) -> None:
        parts = sorted(set(participants))
        if len(parts) < self.params.threshold:
            raise ThresholdError(
                f"round {rnd}: {len(parts)} site(s) can take part {parts}, below the threshold {self.params.threshold}"
            )
        self._round = {"rnd": rnd, "participants": parts, "sum": None, "layout": None, "received": {}}

    def add_masked(self, site: str, message: Mapping[str, Any]) -> None:
        r = self._require_round()
        if site not in r["participants"]:
            raise ProtocolError(f"round {r['rnd']}: {site} is not a participant")
        if site in r["received"]:
            raise ProtocolError(f"round {r['rnd']}: a second masked input from {site}")
        masked = message["masked"]
        if WEIGHT_KEY not in masked:
            raise ProtocolError(f"round {r['rnd']}: {site}'s input carries no masked weight")
        order = [k for k in sorted(masked) if k != WEIGHT_KEY] + [WEIGHT_KEY]  # as the site flattened it
        layout = [(k, tuple(np.shape(masked[k]))) for k in order]
        if r["layout"] is None:
            r["layout"] = layout
        elif layout != r["layout"]:
            raise ProtocolError(f"round {r['rnd']}: {site}'s masked input has a different layout")
        flat = np.concatenate([np.asarray(masked[k], dtype=np.uint32).ravel() for k, _ in layout])
        r["sum"] = flat.copy() if r["sum"] is None else r["sum"] + flat  # uint32 arithmetic wraps modulo 2^32
        r["received"][site] = {
            "self_shares": dict(message.get("self_shares") or {}),
            "self_commit": message.get("self_commit"),
        }

    def _require_round(self) -> dict[str, Any]:
        if self._round is None:
            raise ProtocolError("no round started")
        return self._round

    def survivors(self) -> tuple[list[str], list[str]]:
        r = self._require_round()
        S = sorted(r["received"])
        return S, sorted(set(r["participants"]) - set(S))

    def unmask_requests(self) -> dict[str, dict[str, Any]]:
        """Per survivor: the survivors, the dropped, and the ciphertexts addressed to it."""
        r = self._require_round()
        S, D = self.survivors()
        if len(S) < self.params.threshold:
            raise ThresholdError(
                f"round {r['rnd']}: only {len(S)} masked input(s) arrived {S}, below the secure-aggregation threshold "
                f"{self.params.threshold}: the sum cannot be unmasked (dropped: {D})"
            )
        requests = {}
        for v in S:
            requests[v] = {
                "round": r["rnd"],
                "survivors": S,
                "dropped": D,
                "self_shares": {u: r["received"][u]["self_shares"][v] for u in S if u != v},
                "key_shares": {u: self._key_shares.get(v, {}).get(u) for u in D},
            }
        return requests

    def finish(self, responses: Mapping[str, Mapping[str, Mapping[str, str]]]) -> tuple[dict[str, np.ndarray], float]:
        """Unmask the round's sum from the survivors' shares: ``(Σ w_u·Δ_u / Σ w_u per key, Σ w_u)``."""
        r = self._require_round()
        p = self.params
        S, D = self.survivors()
        members = sorted(self.table)
        x_of = {s: i + 1 for i, s in enumerate(members)}
        responders = sorted(set(responses) & set(S))
        if len(responders) < p.threshold:
            raise ThresholdError(
                f"round {r['rnd']}: only {len(responders)} survivor(s) returned their shares {responders}, below the "
                f"threshold {p.threshold}: the sum cannot be unmasked"
            )
        total = r["sum"].copy()
        n = total.size
        for u in S:  # self-masks of the survivors
            shares = [
                (x_of[v], shamir.share_from_bytes(bytes.fromhex(responses[v]["self"][u])))
                for v in responders
                if u in responses[v].get("self", {})
            ]
            seed = self._combine(shares, f"round {r['rnd']}: self-mask of {u}")
            if hashlib.sha256(seed).hexdigest() != r["received"][u]["self_commit"]:
                raise ProtocolError(
                    f"round {r['rnd']}: the reconstructed self-mask of {u} does not match its commitment"
                )
            total -= stream(self_seed(seed, job_id=p.job_id, rnd=r["rnd"]), n)
        for u in D:  # pairwise masks between the dropped and the survivors
            shares = [
                (x_of[v], shamir.share_from_bytes(bytes.fromhex(responses[v]["key"][u])))
                for v in responders
                if u in responses[v].get("key", {})
            ]
            private = kx.private_from_bytes(self._combine(shares, f"round {r['rnd']}: private key of dropped {u}"))
            if kx.public_bytes(private) != self.table[u]:
                raise ProtocolError(f"round {r['rnd']}: the reconstructed key of {u} does not match its public key")
            assert self.transcript is not None
            transcript = bytes.fromhex(self.transcript)
            for v in S:
                prg = stream(
                    pair_seed(kx.agree(private, self.table[v]), transcript=transcript, job_id=p.job_id, rnd=r["rnd"]), n
                )
                if _pair_sign(v, u) > 0:  # v added it
                    total -= prg
                else:
                    total += prg
        self.revealed.update(D)
        values = decode_sum(total, frac_bits=p.frac_bits)
        weight = float(values[-1])
        if not weight > 0:
            raise ProtocolError(f"round {r['rnd']}: the unmasked total weight is {weight}: the sum is corrupt")
        out, offset = {}, 0
        for key, shape in r["layout"]:
            if key == WEIGHT_KEY:
                continue
            size = int(np.prod(shape, dtype=np.int64))
            out[key] = values[offset : offset + size].reshape(shape) / weight
            offset += size
        self._round = None
        return out, weight

    def _combine(self, shares: list[tuple[int, int]], what: str) -> bytes:
        try:
            return shamir.combine(shares, self.params.threshold)
        except shamir.ShamirError as e:
            raise ThresholdError(f"{what}: {e}") from None
