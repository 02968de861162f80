"""The routes of the web service, one ``APIRouter`` a module: ``service`` (the page, health,
metrics, what the page needs), ``search`` (search by photo) and ``items`` (an item, its photo and
explanations; adding and deleting items with the API key)."""
