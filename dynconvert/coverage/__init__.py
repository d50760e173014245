"""The coverage check: every registered strategy on many timm architectures, through the
strategy contract only (``bench/coverage.py`` runs it over the catalogue; the tests on timm's
tiny test models)."""

from dynconvert.coverage.catalogue import MODELS, ModelSpec, all_specs, build_base, spec_for, timm_test_specs
from dynconvert.coverage.check import STEPS, check_model

__all__ = ["MODELS", "STEPS", "ModelSpec", "all_specs", "build_base", "check_model", "spec_for", "timm_test_specs"]
