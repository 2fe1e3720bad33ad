"""Offline batch scoring: input listing, result part files, and the local and Ray engines.

Ray is imported only inside `service.scoring.ray_engine`, never by anything the serving path loads.
"""
