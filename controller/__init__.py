"""The Coffer controller: catalog, scheduler, jobs, datastores, and the gRPC services for agents
and operators.
"""
