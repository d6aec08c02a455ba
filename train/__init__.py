"""Training adapters on a frozen DiT (installed as ``vlhooks.train``).

Owns the Lightning module, data module and the ``vlhooks train`` entry; the injection itself comes from
``vlhooks.apply_injection``, the same code path as inference.
"""
