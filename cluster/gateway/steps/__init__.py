"""The gateway's steps, one module each, in request order (see cluster.gateway.build):

authenticate -> validate -> session -> tokenize -> choose_pool -> route -> dispatch -> finish
"""
