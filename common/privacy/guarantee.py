"""What a guarantee is about, as types: whose data (:class:`Unit`), which pairs of data sets
(:class:`Relation`) and how the units were chosen (:class:`Sampling`). Every release event and
every ledger names all three; nothing derives one from another."""

from __future__ import annotations

from enum import Enum

from common.privacy import analysis


class Unit(str, Enum):
    """Whose data the guarantee protects (the unit of privacy)."""

    #: One user's entire data: all their ratings (and anything derived from them).
    USER = "user"
    #: One silo's entire data: a client that holds many users (silo-level DP).
    SILO = "silo"


class Relation(str, Enum):
    """Which pairs of data sets the guarantee cannot tell apart.

    σ of an event is always the noise std over the norm bound C of ONE unit's contribution;
    the relation says how far two neighbouring inputs can move the mechanism's input.
    """

    #: One unit's data present or absent ("zero-out": the population size N that fixes the
    #: denominator q·N is public, so removing a unit changes the sum by at most C).
    ADD_OR_REMOVE_ONE = analysis.ADD_OR_REMOVE
    #: One unit's data replaced by any other: the contribution moves by up to 2C (local DP, where
    #: each device always sends; a user inside a silo, whose silo sends either way).
    REPLACE_ONE = analysis.REPLACE_ONE


class Sampling(str, Enum):
    """How the units of a release were chosen, as far as the accounting may use it."""

    #: Each unit joined independently with probability q, and the draw was secret from whoever
    #: the guarantee is stated against: amplification by subsampling applies.
    POISSON = "poisson"
    #: No amplification is claimed (q is kept for the report only): every release is charged to
    #: every unit as if it took part.
    NONE = "no-amplification"
