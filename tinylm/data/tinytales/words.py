"""Word classes of the TinyTales grammar (see `tinylm.tinytales`).

Every filler is one lowercase word (names are capitalised) that a small child knows, so a slot is
exactly one token of the validator. Words that take "an" by their spelling but not their sound
("unicorn", "hour") are left out because the article rule is spelling-based.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    """Split a whitespace-separated word list, dropping duplicates but keeping order."""
    return tuple(dict.fromkeys(text.split()))


GIRL_NAMES = _words("""
Lily Emma Mia Lucy Anna Sara Zoe Ella Amy Ruby Rosie Daisy Molly Sophie Chloe Grace Hannah Kate
Lara Maya Nina Olivia Poppy Rose Sally Tina Wendy Alice Bella Clara Dora Eva Fiona Greta Holly
Ivy Jane Julia Kim Laura Lena Lisa Lola Luna Mary Megan Millie Nora Paula Penny Rita Sofia Susie
Tara Una Vera Violet Abby Ada Beth Cara Dana Elsie Faye Gina Hazel Iris Jenny Kara Leah Lila Mila
Nell Orla Pia Rae Stella Tess Willa Zara Amber Ava Cleo Edie Freya Hope Isla Jade Josie Katie
Libby Maisie Nadia Pearl Quinn Ruth Sadie Tilly Wren Yara Bonnie Carla Debbie Erin Flora Heidi
Ingrid Joy Lucia Martha Nancy Olive Phoebe Rachel Sylvie Trudy
""")


BOY_NAMES = _words("""
Tom Ben Max Sam Jack Leo Tim Jake Noah Liam Oliver Harry Charlie Oscar Finn Henry Adam Alex Bob
Dan Eli Fred George Hugo Ian Joe Kai Luke Mark Ned Owen Paul Ray Seth Theo Toby Vince Will Zack
Andy Billy Carl Dave Eddie Felix Gus Hank Ivan Jim Kevin Larry Milo Nick Ollie Pete Rex Rudy Simon
Teddy Victor Walter Arlo Bert Cody Dylan Ethan Frank Gabe Harvey Isaac Jasper Kyle Louis Mason
Nate Otto Percy Quentin Ralph Stan Timmy Ted Wade Abe Barney Colin Declan Ernie Jonah Levi Micah
Neil Omar Roger Rory Shane Troy Xavier Zeke Archie Brody Caleb Eric Flynn Grant Hamish Jesse Kurt
Lenny Mikey Niall Patrick Reggie Sid
""")


# Living things a child can meet, pet or see in a picture book.
ANIMALS = _words("""
dog cat bird frog duck rabbit bunny puppy kitten mouse horse pony cow pig sheep lamb goat hen
chicken rooster fox bear wolf deer owl fish turtle snail bee ant butterfly ladybug spider worm
squirrel hedgehog lion tiger elephant giraffe zebra monkey panda koala kangaroo hippo rhino camel
crocodile snake lizard parrot penguin seal whale dolphin shark octopus crab starfish goose swan
robin sparrow crow eagle hawk pigeon bat beaver otter raccoon skunk moose donkey mule llama
chipmunk hamster goldfish bug caterpillar dragonfly firefly grasshopper cricket beetle moth
jellyfish lobster puffin flamingo peacock ostrich gorilla cheetah leopard badger mole toad
kitty calf foal duckling chick cub piglet alpaca buffalo bison walrus orca seahorse
snail slug newt tadpole vulture heron stork pelican gecko iguana ferret gerbil weasel stoat
hummingbird woodpecker kingfisher magpie wren finch canary dove
""")


TOYS = _words("""
ball kite doll teddy truck car train boat plane robot drum top yoyo puzzle block balloon bubble
wagon scooter bike skateboard jumprope marble crayon pencil book puppet rocket spaceship castle
dollhouse whistle rattle bear dinosaur dragon soldier horn harmonica xylophone tambourine maraca
slinky frisbee hoop bucket spade shovel sandcastle pinwheel parachute helicopter tractor bulldozer
digger firetruck ambulance bus taxi submarine sailboat canoe raft sled wand crown tiara mask cape
necklace bracelet ring locket button badge sticker stamp postcard card map compass flashlight
lantern magnet telescope binoculars camera clock watch mirror comb brush ribbon bow feather shell
pebble stone gem jewel coin key lock box basket bag backpack purse wallet umbrella blanket pillow
quilt cushion rug kaleidoscope trumpet jigsaw domino paintbox storybook sketchbook
notebook beanbag glider kazoo spinner lasso trampoline seesaw
""")


FOODS = _words("""
apple banana orange pear peach plum grape cherry strawberry blueberry raspberry lemon lime melon
watermelon pineapple mango kiwi coconut apricot fig berry carrot potato tomato pea bean corn
pumpkin cucumber onion pepper lettuce cabbage broccoli spinach celery radish beet mushroom bread
roll bun muffin cookie cake cupcake pie tart donut pancake waffle biscuit cracker pretzel sandwich
burger hotdog pizza taco noodle pasta rice soup stew salad egg omelet cheese butter jam honey
yogurt cereal porridge oatmeal sausage bacon ham chicken fish candy lollipop chocolate toffee
fudge caramel popcorn peanut almond walnut raisin date icecream pudding jelly custard milk juice
water tea lemonade cocoa smoothie milkshake sundae cheesecake brownie scone bagel toast crumpet pickle olive avocado zucchini leek turnip parsnip
yam lentil grapefruit tangerine nectarine cranberry gooseberry blackberry dumpling meatball
""")


PLACES = _words("""
park beach forest farm zoo lake river hill garden market school library playground pond meadow
field mountain valley village town city castle island cave jungle desert seaside harbor bakery
shop store museum circus fair carnival orchard barn stable meadow woods camp campsite lighthouse
station airport bridge street square pool river shore cliff waterfall swamp marsh canyon
tower palace cottage cabin treehouse greenhouse kitchen attic basement cellar garage backyard
porch yard hospital church theater stadium aquarium farmhouse windmill mill fountain tunnel
hedge lane road highway canal quarry ranch prairie volcano glacier
""")


# Things of the outdoors a story can look at, pick up or sit under.
NATURE = _words("""
tree flower rock leaf stick twig log bush grass moss mud sand puddle rainbow cloud sun moon star
sky wind breeze rain snow snowflake icicle acorn pinecone seed root branch trunk petal stem vine
berry nest egg web hole pebble boulder stream wave tide dune hill path trail fence gate rose
daisy tulip lily sunflower dandelion violet poppy clover daffodil bluebell buttercup fern oak
pine maple willow birch cactus mushroom thorn bark hay straw feather shadow
sunbeam sunset sunrise raindrop dewdrop frost ice lightning thunder
""")


# Adjectives for things.
ADJECTIVES = _words("""
big small tiny huge little long short tall round flat soft hard smooth rough shiny sparkly bright
dark light heavy warm cold hot cool wet dry clean dirty new old fresh pretty beautiful lovely
ugly fancy plain fluffy fuzzy furry silky bumpy spotty stripy sticky squishy bouncy springy wobbly
loud quiet noisy silent magic special
strange funny silly odd wonderful amazing great fine good nice best perfect broken torn cracked
empty full open closed busy lazy sleepy hungry thirsty golden silver wooden paper plastic metal
glass woolly cozy snug tidy messy dusty muddy sandy rusty gentle wild tame fast slow quick
clever smart wise brave strong weak proud shy kind friendly happy sad jolly merry cheerful
colorful giant mini huge enormous gigantic narrow wide deep shallow thick thin curly straight
striped spotted dotted sharp pointy crooked hollow solid slimy 
frozen melted hairy scaly feathery glowing twinkly tangled knotted lumpy spiky shaggy
""")


# Adjectives for a child's mood ("Lily felt ___").
FEELINGS = _words("""
happy sad glad scared afraid angry cross upset lonely proud brave calm excited nervous worried
shy sleepy tired hungry grumpy silly cheerful joyful hopeful curious surprised thankful grateful
sorry jealous bored cozy safe free relieved amazed puzzled confused gloomy merry delighted
""")


# Adjectives for a person ("a ___ girl").
KINDS = _words("""
little kind brave happy curious funny clever shy gentle friendly cheerful quiet busy playful
helpful smart sweet polite silly sleepy small young bright bold careful lively jolly cheeky
giggly chatty loving caring patient
""")


COLORS = _words("""
red blue green yellow orange purple pink brown black white gray gold silver violet indigo
turquoise beige cream tan teal
""")


# Things a child likes to do ("to ___").
ACTS = _words("""
play run jump dance sing swim read paint draw climb skip hop bake cook build dig explore laugh
ride skate ski sled fish hike camp whistle hum clap spin twirl roll slide swing bounce race chase
hide seek count write color sew knit garden plant water feed walk march splash float paddle row
sail fly wander travel giggle smile rest nap dream listen learn help share tidy wash sweep stretch wiggle tiptoe crawl kick throw toss pour stir mix knock
wave shout whisper snuggle cuddle tickle juggle doodle scribble
""")


ADVERBS = _words("""
quickly slowly gently softly quietly loudly happily sadly carefully bravely kindly proudly
calmly sweetly brightly warmly politely patiently eagerly gladly merrily cheerfully nicely
neatly easily safely together suddenly finally slowly quietly bravely joyfully softly
busily playfully shyly wisely gladly lightly
""")


FAMILY = _words("mom dad grandma grandpa aunt uncle nana granny papa mommy daddy")


JOBS = _words("""
teacher baker farmer doctor nurse vet firefighter pilot sailor driver cook chef painter builder
gardener mailman postman policeman fisherman zookeeper librarian dentist dancer singer clown
magician astronaut scientist shopkeeper plumber carpenter tailor banker waiter captain ranger
keeper guard miner potter jeweler butcher grocer barber cowboy knight princess prince king queen
""")


CLOTHES = _words("""
hat cap coat jacket scarf mittens gloves boots shoes socks sweater shirt dress skirt pants shorts
jeans apron raincoat pajamas slippers sneakers sandals belt vest hood helmet bonnet tie overalls
swimsuit earmuffs wellies leggings nightgown tutu
""")


FURNITURE = _words("""
bed chair table sofa couch desk shelf bookcase cupboard closet drawer lamp rug carpet curtain
window door stairs bench stool crib cradle cabinet fridge oven stove sink bathtub shower
fireplace mat wardrobe dresser
""")


VEHICLES = _words("""
car bus train truck boat ship plane bike van taxi tractor wagon sled rocket jeep scooter
tram ferry yacht balloon carriage cart helicopter motorbike canoe kayak
""")


INSTRUMENTS = _words("""
drum piano guitar violin flute trumpet horn harp bell tambourine xylophone harmonica recorder
banjo triangle cello trombone bugle kazoo
""")


BODY = _words("""
arm leg knee foot toe hand finger thumb nose ear eye mouth tooth chin cheek head hair neck
shoulder elbow wrist tummy back ankle heel lip
""")


TOOLS = _words("""
hammer saw spade rake hoe broom mop bucket sponge brush scissors glue tape string rope ladder
net hose wheelbarrow needle thread paintbrush pencil ruler chalk wrench screwdriver nail
""")


SEA = _words("""
shell crab seaweed starfish wave pearl sandcastle seagull pebble driftwood
""")


AGES = _words("three four five six seven eight nine")


NUMBERS = _words("two three four five six seven eight nine ten eleven twelve")


TIMES = _words("morning afternoon evening night day")


WEATHER = _words("sunny rainy windy snowy cloudy foggy stormy chilly frosty breezy misty")


SHAPES = _words("circle square triangle star heart diamond oval moon")


GAMES = _words("""
tag catch chess checkers dominoes marbles soccer football baseball basketball tennis hopscotch
cards bingo puzzles leapfrog jacks charades
""")


SWEETS = _words("""
cake cookie candy cupcake pie tart donut muffin lollipop chocolate toffee fudge brownie pudding
jelly sundae icecream
""")


SOUNDS = _words("""
bang boom crash splash buzz hiss moo woof meow quack tweet honk beep ding dong pop crack thud
squeak roar
""")


# Moods for the problem and the resolution of a story.
SAD_FEELINGS = _words("sad upset worried lonely scared grumpy nervous gloomy cross unhappy")


GLAD_FEELINGS = _words("happy glad proud calm thankful cheerful joyful delighted relieved excited")


GOOD = _words("good great wonderful lovely happy special fun busy perfect amazing fine nice")


FLOWERS = _words("""
rose daisy tulip lily sunflower dandelion violet poppy clover daffodil bluebell buttercup orchid
pansy marigold lavender
""")


# Adjectives for food ("a ___ cake").
TASTES = _words("crunchy chewy juicy sweet sour salty tasty yummy spicy crispy gooey warm fresh soft")
