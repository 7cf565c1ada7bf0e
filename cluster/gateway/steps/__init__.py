"""The gateway's steps, one module each, in request order (see cluster.gateway.build):

trace -> measure -> authenticate -> validate -> session -> tokenize -> choose_pool -> route
-> trace_engine_call -> dispatch -> finish
"""
