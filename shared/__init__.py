"""Code both the controller and the agent use: domain types, formats, errors, wire code.

Nothing here does the I/O of one side; `shared` imports neither `controller` nor `agent`.
"""
