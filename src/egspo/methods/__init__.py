"""Methods that plug into the RL iteration's hooks (`egspo.methods.base`): UEC-RL and OGER."""

from egspo.methods.base import RLMethod, RolloutContext, check_methods
from egspo.methods.oger import OGER, BonusSchedule
from egspo.methods.uec import UECRL

__all__ = ["OGER", "UECRL", "BonusSchedule", "RLMethod", "RolloutContext", "check_methods"]
