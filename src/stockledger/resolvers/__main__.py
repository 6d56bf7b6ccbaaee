"""Print the served schema's SDL: ``python -m stockledger.resolvers > schema.graphql``.

Same text as ``strawberry export-schema stockledger.resolvers.root:schema`` (which needs
strawberry-graphql's ``cli`` extra); ``tests/test_graphql_contract.py`` checks the committed file.
"""

import sys

from stockledger.resolvers.root import print_sdl

sys.stdout.write(print_sdl())
