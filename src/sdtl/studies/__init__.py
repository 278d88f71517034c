"""Studies: commands that run many training runs and summarise them (demo, compare, sweep, wise).

They sit above the engine: a study builds configs, hands runs to an executor and reads their
results; nothing in the engine imports a study.
"""
