"""The foundation every layer trusts: workspace layout, the one name -> path rule, config, migrations.

``core`` imports nothing of ours; ``rag``, ``tuning`` and ``serving`` import it.
"""
