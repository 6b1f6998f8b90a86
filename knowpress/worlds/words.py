"""Word lists the synthetic world is built from (invented, licence-free, plain ASCII words).

Values are combinations of these words (``"Port Ashby"``, ``"Hartwell Institute of
Technology"``, ``"Corvane Logistics"``), so a value pool of any size up to the number of
combinations can be drawn deterministically. Every word is letters only: a word-level
tokenizer maps each to one token and answer normalisation never changes it.

Changing any list changes every world: bump ``WORLD_VERSION`` in ``config.py`` when you do.
"""

from __future__ import annotations

FIRST_NAMES: tuple[str, ...] = (
    "Aaron", "Abigail", "Adrian", "Alma", "Alvin", "Amelia", "Andre", "Anna", "Arlo", "Astrid",
    "Austin", "Beatrix", "Benedict", "Beth", "Blake", "Bridget", "Bruno", "Caleb", "Camila",
    "Carmen", "Cecil", "Celeste", "Clara", "Colin", "Cora", "Damian", "Daphne", "Delia", "Dexter",
    "Dina", "Dorian", "Edgar", "Edith", "Elena", "Elias", "Elise", "Emmett", "Esther", "Ezra",
    "Fabian", "Faye", "Felix", "Fiona", "Flora", "Gideon", "Greta", "Hannah", "Harvey", "Hazel",
    "Hector", "Helena", "Hugo", "Ida", "Imogen", "Irene", "Isaac", "Ivan", "Ivy", "Jasper",
    "Joel", "Josie", "Julian", "June", "Kara", "Keith", "Kira", "Lars", "Leah", "Leon", "Lila",
    "Lionel", "Lucia", "Luther", "Mabel", "Magnus", "Marcel", "Mara", "Milo", "Mina", "Miriam",
    "Nadia", "Nathan", "Nell", "Nico", "Nina", "Nolan", "Odette", "Oscar", "Otis", "Paloma",
    "Pearl", "Peter", "Phoebe", "Quentin", "Quinn", "Rafael", "Ramona", "Reid", "Rhea", "Rosa",
    "Rufus", "Sabine", "Selma", "Silas", "Stella", "Tobias", "Tessa", "Theo", "Uma", "Ursula",
    "Vera", "Victor", "Viola", "Wade", "Wendy", "Xavier", "Yara", "Yusuf", "Zelda", "Zora",
)  # fmt: skip

LAST_NAMES: tuple[str, ...] = (
    "Abbott", "Alder", "Archer", "Ashdown", "Barlow", "Baxter", "Bellamy", "Blackwood", "Bramley",
    "Brennan", "Calloway", "Carver", "Castell", "Chandler", "Cole", "Corbin", "Crane", "Dalton",
    "Darrow", "Delaney", "Dunmore", "Easton", "Ellery", "Emberly", "Fairley", "Fenwick", "Fletcher",
    "Forsythe", "Fowler", "Garrick", "Gilmore", "Glover", "Granger", "Hadley", "Halloway",
    "Harlow", "Hawthorne", "Holloway", "Huxley", "Ingram", "Irving", "Jarvis", "Keating",
    "Kendrick", "Kingsley", "Lachlan", "Langford", "Larkin", "Lockhart", "Lowell", "Maddox",
    "Marlowe", "Mercer", "Merritt", "Monroe", "Morrow", "Nash", "Norwood", "Oakley", "Orwell",
    "Pascoe", "Pendry", "Prescott", "Quincey", "Radcliffe", "Ramsey", "Redford", "Rowntree",
    "Sawyer", "Selwyn", "Sheldon", "Sinclair", "Stanton", "Sterling", "Talbot", "Thorne",
    "Tierney", "Underwood", "Vance", "Vaughan", "Wakefield", "Warrick", "Whitlock", "Winslow",
    "Wolcott", "Yardley", "Yates", "Ziegler", "Brightwater", "Copperfield", "Dunstan", "Everly",
    "Goodwin", "Hartigan", "Kessler", "Lindqvist", "Moreau", "Ostrander", "Pryce", "Rourke",
)  # fmt: skip

# Birth cities: ``{form}`` applied to each root, e.g. "Lake Marion", "Ashby Falls".
CITY_ROOTS: tuple[str, ...] = (
    "Marion", "Ashby", "Belmont", "Cedarvale", "Dunmere", "Elmridge", "Fairhaven", "Glenrock",
    "Harrowgate", "Ironwood", "Juniper", "Kestrel", "Larchmont", "Meadowbrook", "Northam",
    "Oakhurst", "Pinecrest", "Quarry", "Ravenswood", "Silverton", "Thornbury", "Upton", "Valemont",
    "Westfield", "Yarrow", "Amberley", "Brookhaven", "Clearwater", "Dovecote", "Eastbourne",
    "Foxhollow", "Greystone", "Hollins", "Ivydale", "Kingsbridge", "Linden", "Millbrook",
    "Newcastle", "Orchard", "Pembrook", "Redhill", "Stonebridge", "Tamarack", "Umber", "Wickham",
    "Alderney", "Bramble", "Coldspring", "Driftwood", "Emberton",
)  # fmt: skip
CITY_FORMS: tuple[str, ...] = (
    "{}", "Port {}", "Lake {}", "New {}", "{} Falls", "{} Springs", "Fort {}", "{} Heights",
)  # fmt: skip

# Universities: ``{form}`` applied to each root, e.g. "University of Hartwell".
UNIVERSITY_ROOTS: tuple[str, ...] = (
    "Hartwell", "Pemberton", "Ashcombe", "Bexley", "Carrow", "Danforth", "Everton", "Fairmont",
    "Gresham", "Hollister", "Islington", "Jarrow", "Kenmore", "Lindale", "Montrose", "Norcross",
    "Oldham", "Penrose", "Quayle", "Rosewood", "Stratford", "Trenton", "Ulverston", "Verity",
    "Whitmore", "Axford", "Blaydon", "Claremont", "Dunholme", "Eldridge", "Farnham", "Galloway",
    "Hensley", "Ingleby", "Kirkwood", "Lowther", "Marchmont", "Newbury", "Oxley", "Prentice",
    "Ridley", "Somerton", "Thackeray", "Upshaw", "Waverley", "Wexford", "Brantley", "Corwen",
    "Durward", "Elsworth", "Fordham", "Grantley", "Halsey", "Kelham", "Lambourne", "Medway",
    "Northcote", "Ormsby", "Pickering", "Rothwell", "Saltmarsh", "Tillbury", "Vernham",
    "Winterton", "Yelverton", "Ainsley", "Bradwell", "Chesterton", "Denholm", "Eversley",
)  # fmt: skip
UNIVERSITY_FORMS: tuple[str, ...] = (
    "University of {}", "{} University", "{} College", "{} Institute of Technology",
    "{} State University",
)  # fmt: skip

MAJORS: tuple[str, ...] = (
    "Accounting", "Aerospace Engineering", "Agricultural Science", "Anthropology", "Archaeology",
    "Architecture", "Art History", "Astronomy", "Biochemistry", "Bioengineering", "Biology",
    "Biomedical Engineering", "Botany", "Business Administration", "Cell Biology",
    "Chemical Engineering", "Chemistry", "Civil Engineering", "Classics", "Cognitive Science",
    "Communications", "Comparative Literature", "Computer Engineering", "Computer Science",
    "Creative Writing", "Criminology", "Dance", "Data Science", "Dentistry", "Design", "Ecology",
    "Economics", "Education", "Electrical Engineering", "English Literature",
    "Environmental Science", "Epidemiology", "Ethnic Studies", "Film Studies", "Finance",
    "Fine Arts", "Forestry", "French", "Genetics", "Geography", "Geology", "German",
    "Graphic Design", "Health Sciences", "History", "Hospitality Management",
    "Industrial Engineering", "Information Systems", "International Relations", "Journalism",
    "Kinesiology", "Law", "Linguistics", "Management", "Marine Biology", "Marketing",
    "Materials Science", "Mathematics", "Mechanical Engineering", "Medicine", "Meteorology",
    "Microbiology", "Music", "Music Theory", "Neuroscience", "Nuclear Engineering", "Nursing",
    "Nutrition", "Oceanography", "Pharmacology", "Pharmacy", "Philosophy", "Photography",
    "Physical Therapy", "Physics", "Political Science", "Psychology", "Public Health",
    "Public Policy", "Religious Studies", "Robotics", "Russian", "Social Work", "Sociology",
    "Software Engineering", "Spanish", "Statistics", "Supply Chain Management",
    "Theatre", "Urban Planning", "Veterinary Science", "Zoology", "Astrophysics", "Game Design",
    "Applied Mathematics", "Music Composition", "Sports Science", "Toxicology", "Optometry",
)  # fmt: skip

# Employers: ``{root} {suffix}``, e.g. "Corvane Logistics".
EMPLOYER_ROOTS: tuple[str, ...] = (
    "Corvane", "Altamir", "Brightlane", "Cobalt", "Deltaris", "Everstone", "Frostline", "Goldcrest",
    "Helion", "Indigo", "Jadeport", "Keystone", "Lumora", "Meridian", "Nimbus", "Obsidian",
    "Pinnacle", "Quasar", "Redwood", "Solstice", "Tidewater", "Ultrix", "Vantage", "Windrose",
    "Zenith", "Arclight", "Bluefin", "Cascade", "Driftline", "Ember", "Foxglove", "Granite",
    "Harbor", "Ionic", "Juniperline", "Kinetic", "Lodestar", "Monarch", "Northwind", "Orion",
)  # fmt: skip
EMPLOYER_SUFFIXES: tuple[str, ...] = (
    "Systems", "Logistics", "Foods", "Labs", "Motors", "Capital", "Energy", "Health", "Media",
    "Robotics", "Pharmaceuticals", "Textiles",
)  # fmt: skip

MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip

# Pronoun attribute values (bioS: two values); capitalised when they start a bio sentence.
PRONOUNS: tuple[str, ...] = ("he", "she")
