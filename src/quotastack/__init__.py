"""QuotaStack: a credit-native billing backend.

Layers, one direction of dependency: ``api``/``cli`` -> ``store`` -> ``service`` -> ``domain``.
See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
