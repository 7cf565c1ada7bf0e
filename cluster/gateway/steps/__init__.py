"""The gateway's steps, one module each, in request order (see cluster.gateway.build):

trace -> measure -> authenticate -> validate -> session -> tokenize -> admit -> choose_pool
-> fair_share -> isolate -> route -> trace_engine_call -> dispatch -> finish
"""
