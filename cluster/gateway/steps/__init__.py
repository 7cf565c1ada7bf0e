"""The gateway's steps, one module each, in request order (see cluster.gateway.build):

authenticate -> validate -> session -> tokenize -> admit -> choose_pool -> fair_share -> isolate
-> route -> dispatch -> finish
"""
