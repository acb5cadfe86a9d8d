"""POSTs N requests to URL one after another on one keep-alive connection, each with a fresh
`Idempotency-Key` (PREFIX-i), as benches/http.lua's fresh scenario sends them; fails on any
answer but 2xx. For benches/redis_counts.sh.

    python3 benches/sequential_keys.py http://127.0.0.1:3000/payments 300 run-1
"""

import http.client
import sys
import urllib.parse

url, n, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parts = urllib.parse.urlsplit(url)
connection = http.client.HTTPConnection(parts.hostname, parts.port)
body = b'{"amount":1000,"currency":"usd"}'
for i in range(n):
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer bench",
        "Idempotency-Key": f"{prefix}-{i}",
    }
    connection.request("POST", parts.path, body, headers)
    answer = connection.getresponse()
    answer.read()
    if not 200 <= answer.status < 300:
        sys.exit(f"{url}: {answer.status} for key {prefix}-{i}")
