"""The callback contract suite (issue 15, item 5): every public callback, one settings entry, the same tests.

``settings.py`` holds the table (one :class:`~contract.settings.Entry` per public callback) and the tiny
model / data / trainer they share; ``test_contract.py`` runs the generic contract over it in one process,
``test_contract_ddp.py`` the 2-process CPU DDP part (marked ``slow`` and ``ddp``).
"""
