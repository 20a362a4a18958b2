"""The built-in bias lab: synthetic scenes whose language prior is controlled (see `scenes`)."""

from napo.lab.scenes import SPLITS, load_recipe, make_split, vocabulary, words

__all__ = ["SPLITS", "load_recipe", "make_split", "vocabulary", "words"]
