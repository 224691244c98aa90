"""advdef: benchmark adversarial defenses of image classifiers, honestly.

Train any defense with any adversarial-training method on any architecture, evaluate it with the
official AutoAttack and per-sample worst cases, and report comparable numbers from one store.
"""

__version__ = "0.1.0"
