"""Driving: batched vehicles, maps, scoring and the Gymnasium environments (issue 4, in progress)."""

from trajgen.envs.driving.vehicles import (
    BicycleLimits,
    BicycleState,
    IDMParams,
    KinematicBicycle,
    LaneFollowers,
    LaneFollowerState,
    find_leaders,
    idm_acceleration,
    idm_equilibrium_gap,
    sample_idm_params,
)

__all__ = [
    "BicycleLimits",
    "BicycleState",
    "IDMParams",
    "KinematicBicycle",
    "LaneFollowerState",
    "LaneFollowers",
    "find_leaders",
    "idm_acceleration",
    "idm_equilibrium_gap",
    "sample_idm_params",
]
