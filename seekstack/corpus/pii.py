"""Replace e-mail addresses, public IP addresses and secrets with placeholders.

Secrets: private-key blocks (`-----BEGIN ... PRIVATE KEY-----`, PGP's `... PRIVATE KEY BLOCK-----`, SSH2's `---- BEGIN
SSH2 ENCRYPTED PRIVATE KEY ----`, with a base64 body, to their END line or, cut short, to the next `--`; PuTTY's .ppk
files to their `Private-MAC:` line), passwords in URLs (`postgres://user:s3cr3t@host` keeps `user`; template
placeholders such as `{password}`, `${DB_PASS}` or `%s`, and the words documentation puts there, `user:pass@host`, are
kept), the tokens of known services by their prefixes (OpenAI, AWS, GitHub, Slack and its webhooks' paths, SendGrid
`SG.`, Google, Stripe `sk_live_`/`rk_test_`, Hugging Face `hf_`, GitLab `glpat-`, PyPI `pypi-`, npm `npm_`), JWTs
(`eyJ...`, three base64url parts), HTTP bearer tokens (`Authorization: Bearer ...`, of letters and digits; `Bearer
$TOKEN`, `Bearer {token}` are kept) and basic credentials (`Authorization: Basic ...`, base64 of `user:password`), and
long random values assigned to a name like api_key, secret, token or password.
Not replaced: phone numbers, payment card and bank account numbers, national id numbers, street addresses and people's
names (no pattern tells them from other numbers and words without false positives), secrets of no known form
assigned to no such name, and e-mail addresses spelled out against harvesters (`bob (at) example (dot) com`, `bob at
example dot com`: datatrove's PIIFormatter, which needs an `@`, keeps them too).

Addresses are found through their ASCII forms: one typed in fullwidth characters (`９３．１８４．２１６．３４`) or in
another script's digits (`٩٣.١٨٤.٢١٦.٣٤`) is replaced as its ASCII form would be, and one holding an invisible
character (a zero-width space or joiner, a soft hyphen: `john\u200b@example.com`) as it would be without it.

Only addresses that reach one host on the public internet are replaced (Python's `is_global`, multicast left out;
IPv6 ones in global unicast space, 2000::/3, or NAT64's 64:ff9b::/96).
Private, loopback, link-local and unspecified IPs (`127.0.0.1`, `10.0.0.1`, `::1`, `0.0.0.0`) identify nobody and are
kept, as in the StarCoder PII pipeline, and so are carrier-grade NAT (`100.64.0.1`), documentation (`192.0.2.1`,
`2001:db8::1`, `3fff:0:1::5`) and multicast (`224.0.0.251`, `ff02::1:3`) addresses, the public DNS resolvers
StarCoder's pipeline keeps (`8.8.8.8`, `208.67.222.222`) and the same services' IPv6 ones (`2001:4860:4860::8888`:
`PUBLIC_RESOLVERS`), and networks in CIDR notation (`93.184.216.0/24`); an address with its network's prefix length
(`inet 93.184.216.34/24`, `/32`) or before a URL's path (`http://93.184.216.34/2024/x`) is a host's, an address of
zero-padded octets (`093.184.216.034`) is judged as it reads without the zeros, and an IPv6 address ending in an IPv4
one (`::ffff:93.184.216.34`) is one address, judged as the IPv4 one it maps. A version such as `3.11.7` has three parts
and is never an IPv4 address; a four-part one such as `2.7.2.2` (both leading parts one digit) or after a word naming a
version (`,v 1.10.2.3` in an RCS `$Id$` line, `Revision: 1.22.2.3`), or code's for one (`__version__ = "1.12.0.1"`,
`AssemblyFileVersion("2.15.3.0")`), or a requirement's (`numpy==1.26.4.1`), slices such as `a[1::2]` or `buf[256::]` and
matrix products such as `w@x.mean()` are kept too.
"""

from __future__ import annotations

import base64
import bisect
import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from seekstack.corpus.kinds import UNSPACED_SCRIPT_RANGES

EMAIL = "<EMAIL>"
IP = "<IP>"
SECRET = "<SECRET>"

# Top-level domains (RFC 1591): the ASCII ones IANA delegates (its list, top_level_domains.txt, dated in its first
# line, the internationalized ones in their punycode, `XN--P1AI` for `.рф`, as an address in ASCII writes them; a
# domain of other letters is taken as written, `.рф`); those it delegated once, which old changelogs' addresses end
# in (`ian@uns.ns.ac.yu`); and the names private networks, unnamed hosts and UUCP mail use, which RFC 6761 and ICANN
# reserve or leave undelegated (`ann@corp.internal`, `bo@localhost.localdomain`, `guy@sun.uucp`).
_RETIRED_TOP_LEVEL_DOMAINS = "yu tp zr an um".split()
_PRIVATE_TOP_LEVEL_DOMAINS = "test invalid localhost local localdomain internal lan corp home uucp bitnet".split()


def _top_level_domains() -> list[str]:
    """The ASCII top-level domains an address may end in, lower-cased, longest first."""
    listed = Path(__file__).with_name("top_level_domains.txt").read_text(encoding="ascii").splitlines()
    delegated = {name.lower() for name in listed if name and not name.startswith("#")}
    known = delegated.union(_RETIRED_TOP_LEVEL_DOMAINS, _PRIVATE_TOP_LEVEL_DOMAINS)
    return sorted(known, key=lambda name: (-len(name), name))


def _any_of(names: list[str]) -> str:
    """A regular expression for any of `names`, grouped by first letter: re tries alternatives one by one, and all
    1,300 top-level domains tried at each candidate address made scrubbing a text dense with addresses 10x slower."""
    by_first_letter: dict[str, list[str]] = {}
    for name in names:
        by_first_letter.setdefault(name[0], []).append(re.escape(name[1:]))
    return "|".join(f"{first}(?:{'|'.join(rests)})" for first, rests in sorted(by_first_letter.items()))


_TOP_LEVEL_DOMAINS = _top_level_domains()
# Generic top-level domains common enough to end an address written against the next word of Chinese, Japanese,
# Korean or Thai text, with the two-letter country codes: `张伟@example.com谢谢`; a decorator such as
# `@functools.wraps装饰` ends in no such domain.
_DOMAIN_BEFORE_UNSPACED_TEXT = _any_of(
    "com net org edu gov mil int info biz".split() + [name for name in _TOP_LEVEL_DOMAINS if len(name) == 2]
)


def _combining_marks() -> str:
    """The combining marks (Unicode category M: accents written as their own character, the vowel signs and viramas
    of Indic and Thai words), which `\\w` does not match, of the Basic Multilingual Plane, which holds those of the
    major scripts; not those above it, of small and historic scripts (Adlam, Chakma, Brahmi): re would test each of
    those one by one, for every character of the text."""
    return "".join(chr(code) for code in range(0x10000) if unicodedata.category(chr(code)).startswith("M"))


_COMBINING_MARKS = _combining_marks()


def _ascii_forms() -> dict[int, str]:
    """A `str.translate` table, one character for one, of the forms of ASCII characters that addresses are written in
    outside ASCII: fullwidth ASCII, as Japanese and Chinese input methods type it (`８．８．８．８`,
    `tanaka＠example．co．jp`), and the decimal digits of every script of the Basic Multilingual Plane (Arabic-Indic
    `٩٣.١٨٤.٢١٦.٣٤`, Persian, Devanagari, Thai), which `ipaddress` reads as no number."""
    fullwidth = {code: chr(code - 0xFEE0) for code in range(0xFF01, 0xFF5F)}  # U+FF01-FF5E are ! to ~ fullwidth
    digits = {
        code: str(unicodedata.decimal(chr(code)))
        for code in range(0x80, 0x10000)
        if unicodedata.category(chr(code)) == "Nd"
    }
    return fullwidth | digits


_ASCII_FORMS = _ascii_forms()
_IN_ANOTHER_FORM = re.compile(f"[{''.join(map(chr, _ASCII_FORMS))}]")  # found at C speed: most texts hold none
# Invisible characters that may sit inside a word, and so inside an address, which reads the same with them: a soft
# hyphen (HTML's `&shy;`, set by hyphenation or against harvesters), the zero-width space, non-joiner and joiner, the
# word joiner and a byte-order mark. Addresses are matched without them.
_INVISIBLE_IN_WORDS = "\u00ad\u200b\u200c\u200d\u2060\ufeff"
_HOLDS_INVISIBLE = re.compile(f"[{_INVISIBLE_IN_WORDS}]")
_WITHOUT_INVISIBLE = dict.fromkeys(map(ord, _INVISIBLE_IN_WORDS))


def _email_pattern(excluded: str) -> re.Pattern[str]:
    """E-mail addresses whose local part and domain hold letters, digits and combining marks of any script (RFC 6531:
    `josé@café.fr`, `δοκιμή@παράδειγμα.δοκιμή`, `मोहन@उदाहरण.भारत`) but those of the `excluded` ranges, and whose
    top-level domain is a known ASCII one written in one case or capitalised (`.com`, `.COM`, `.Com`; not `.wraps` in
    `使用@functools.wraps`, `.weight` in `x@self.weight.T` or `.mT` in `a@b.mT`), or all other letters (`wraps装饰` in
    `用@functools.wraps装饰` is none), or a common or country one written against text of a script without spaces
    (`张伟@example.com谢谢`); not before "(": `weights@inputs.mean()` is a matrix product and a method call. Matched
    too, for `_is_address` to tell: an scp-style remote (`git@github.com:user/repo.git`, `bob@server:~/notes`) whole,
    as group `remote_login`, and an unknown ASCII top-level domain before a ">" (".>"), as group `unknown_domain`. A
    domain may also be an IPv4 or IPv6 address literal in brackets (RFC 5321: `postmaster@[93.184.216.34]`,
    `ann@[IPv6:2a00:1450::200e]`), the mailbox of a host without a name, replaced whole, as datatrove's PIIFormatter
    replaces it; or an IPv4 address unbracketed, as group `address`: a login or message id at a host
    (`ann@93.184.216.34`), replaced whole when the host is public (`_is_address`)."""
    outside = re.compile(f"[^{excluded}]" if excluded else r"[\s\S]")
    marks = "".join(mark for mark in _COMBINING_MARKS if outside.match(mark))
    # A mark continues a part, never starts one. Marks are a set beside the letters' rather than a branch: re tests
    # one set per character fast, and a branch of two at every position of the text made scrubbing 20x slower.
    letter, alnum, other_letter = (f"[^\\W{chars}{excluded}]" for chars in ("", "_", "\\d_A-Za-z"))
    unspaced = f"[{UNSPACED_SCRIPT_RANGES}]"
    word_end = rf"(?!{letter}|[{marks}(-])"
    # An apostrophe between two letters is part of a name (`o'neil@`, RFC 5322's atext; `o’neil@` as a word processor
    # writes it, RFC 6531); one before or after an address quotes it (`'ann@example.com'`). The at sign may be escaped,
    # as Perl strings and Markdown write it (`doko\@ubuntu.com` in a Debian copyright file) and Texinfo doubles it
    # (`bug-grep@@gnu.org` in a GNU manual's source), or percent-encoded as a URL's query or path writes it
    # (`?email=john.doe%40gmail.com`: `%` before `40` is no character of the local part then), or twice, as a URL
    # inside another's query writes it (`?next=%2Fu%3Fe%3Djohn.doe%2540gmail.com`), or an HTML character reference,
    # as a page's source writes it against harvesters (`bob&#64;example.com`, `&#x40;`, `&commat;`: `normalise`
    # decodes references only in a text holding no `<`, so a page's markup or code keeps them); it is matched through
    # `_ASCII_FORMS`, so fullwidth too, as Japanese and Chinese pages write it to keep an address from harvesters that
    # look for @ (`tanaka＠example.co.jp`).
    # Between its letters, a local part may also hold RFC 5322's rarer atext characters (`user#tag@`, `jack&jill@`),
    # but not right after a slash: in a URL, `#` opens a fragment (`http://foo.com#ann@example.org` holds the address
    # `ann@example.org`), and `//127.0.0.1#@evil.com` none. Not those that part words from an address in options,
    # queries, paths, tables and markup (`=`, `?`, `/`, `|`, braces, backquotes: `--author=bob@example.com`), nor `!`,
    # which parts a GNU changelog's commit time from its author (`2017-05-18T05:51:31Z!eggert@cs.ucla.edu`).
    apostrophe = "['\u2019]"

    # A local part may open with a percent-encoded character, as a URL encodes every one against harvesters
    # (`%62%6f%62@example.com`), where `%` alone before it is punctuation before the address (`%bob@`).
    def local_part_characters(between_letters: str) -> str:
        within = f"(?:{letter}|[{marks}.+-]|%(?!40|2540){between_letters})*+"
        return rf"(?:{letter}|%(?!40|2540)[0-9A-Fa-f]{{2}}){within}(?:{apostrophe}{letter}{within})*+"

    # Nor does one start inside a name that a match refused (`http://foo-bar@host` holds no `bar@host`): not after a
    # letter or mark, alone or followed by up to three of `.%+-`, nor after four of those; after one to three of them
    # alone it does (`...bob@x.com`, `-bob@x.com`). The punctuation is tested first, which most places fail at once
    # (testing the part first made scrubbing 20% slower).
    part = f"(?:{letter}|[{marks}])"
    part_then = f"(?<=(?:{part}|[.%+-])[.%+-]{{3}})|(?<={part}[.%+-]{{2}})|(?<={part}[.%+-])"
    local_part = (
        rf"(?<!{letter})(?<!{letter}{apostrophe})(?<![{marks}])(?<![.%+-](?:{part_then}))"
        rf"(?:(?<!/){local_part_characters(f'|(?!&commat;)[#$&*^~](?={letter})')}|(?<=/){local_part_characters('')})"
        r"(?:[\\@]?@|%40|%2540|&(?:#0*64|#[xX]0*40|commat);)"
    )
    one_case = r"(?=(?:[a-z]+|[A-Z][a-z]*|[A-Z]+)(?![A-Za-z]))"
    # An image's scale (`icons@2x.zip`, as Apple names its Retina images) or a video's resolution (`clip@1080p.mov`)
    # with a suffix alone after it is a file's name (the suffix may be a top-level domain too), not an address's domain
    file_qualifier = r"(?:[1-9]x|\d{3,4}p)\.[A-Za-z0-9]+(?![\w-]|\.\w)"
    return re.compile(
        rf"{local_part}(?!{file_qualifier})"
        rf"(?:(?P<remote_login>[\w.-]+:(?:[\w~.-]*/|[\w.-]*\.git\b))|\[\d{{1,3}}(?:\.\d{{1,3}}){{3}}\]"
        r"|\[(?i:IPv6):[0-9A-Fa-f:.]+\]"
        r"|(?P<address>[0-9]{1,3}(?:\.[0-9]{1,3}){3})(?!\.?\w|@)"
        rf"|(?:{alnum}(?:{alnum}|[{marks}-])*\.)+"
        rf"(?:(?:{one_case}(?i:{_any_of(_TOP_LEVEL_DOMAINS)})|(?P<unknown_domain>[A-Za-z]{{2,}}(?=\.?>))"
        rf"|{other_letter}(?:{other_letter}|[{marks}])+){word_end}"
        rf"|(?i:{_DOMAIN_BEFORE_UNSPACED_TEXT})(?={unspaced})))"
    )


# First without the scripts written without spaces, whose text writes an address with no space beside it
# (请联系a@b.cn谢谢: the address is a@b.cn); then of any script (用户@例子.广告), taking the whole unspaced run then.
_EMAILS = (_email_pattern(UNSPACED_SCRIPT_RANGES), _email_pattern(""))
# An octet may be zero-padded, as fixed-width tables and logs write it (`093.184.216.034`): a reader reads the address
# without the zeros, and so it is judged (`_address`).
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d|0\d{1,2})"
# An address stands apart from the letters and digits around it (`v1.2.3.4`, `1.2.3.4a`, `fe80::1x` are none), but
# not from an underscore, which parts the words of a name as a dash does (`host_93.184.216.34`, a log file's
# `93.184.216.34_access.log`: datatrove's PIIFormatter replaces those too), nor from the letters of the scripts
# written without spaces, whose text writes it against the next word (`服务器IP为<IP>，`).
_WORD_BESIDE = f"[^\\W_{UNSPACED_SCRIPT_RANGES}]"
# (The lookahead first: the lookbehind's large set is tested only where an address may start.) A prefix length after
# it (`/24`, CIDR notation), not a path (`http://93.184.216.34/2024/05/x.html`), is read with it: `_is_host` tells a
# network from a host.
_PREFIX_LENGTH = r"(?:/(?P<prefix>\d{1,3})\b(?!/|\.\d))?"
_IPV4 = re.compile(
    rf"(?=\d)(?<!{_WORD_BESIDE})(?<!\.)(?P<address>{_OCTET}(?:\.{_OCTET}){{3}}){_PREFIX_LENGTH}(?!\.?{_WORD_BESIDE})"
)
# An IPv4 address written into a host's name with dashes, as clouds and ISPs name hosts after it
# (`ec2-93-184-216-34.compute-1.amazonaws.com`, a home's `c-73-15-22-1.hsd1.ca.comcast.net` in a mail's Received
# header or a log's reverse lookup): its dashed octets end a label, before a domain's name and its top-level domain
# (not a file's `backup-11-12-15-30.log`, `.tar.gz`, nor one whose suffix is a top-level domain too,
# `clip-12-25-20-19.mov`, `.zip`, `.sh`); judged as the dotted address (`ip-10-0-0-5.ec2.internal` is kept). Up to 8
# labels of up to 63 characters (RFC 1035) are read after it: linear time in a long chain of dashed numbers.
_IPV4_IN_HOST_NAME = re.compile(
    rf"(?=\d)(?<!\d)(?<!\b\d-)(?<!\b\d\d-)(?<!\b\d\d\d-)(?P<address>{_OCTET}(?:-{_OCTET}){{3}})"  # not a 5th number's
    rf"(?=\.(?:[A-Za-z0-9-]{{1,63}}\.){{1,8}}(?i:{_any_of(_TOP_LEVEL_DOMAINS)})(?![\w-]))"
)
# An IPv6 address may end in an IPv4 one (`::ffff:93.184.216.34`, IPv4-mapped; `64:ff9b::93.184.216.34`): the whole
# is the address, matched before `_IPV4` can take its tail alone. It opens with a hex digit or `::` (not a label's
# colon, `地址:2a00:...`), after no `.` and no `:` but a label's (`addr:2a00:...`) or RFC 5321's address literal's
# (`[IPv6:2a00:...]`, as a Received header and a mailbox at a host without a name write it).
_IPV6 = re.compile(
    rf"(?=[0-9A-Fa-f]|::)(?<!{_WORD_BESIDE})(?:(?<![:.])|(?<=[^0-9A-Fa-f:.\s]:)|(?<=[Ii][Pp][Vv]6:))"
    rf"(?P<address>(?:[0-9A-Fa-f]{{0,4}}:){{2,6}}{_OCTET}(?:\.{_OCTET}){{3}}"
    rf"|(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:[0-9A-Fa-f]{{1,4}}|:)?){_PREFIX_LENGTH}(?!{_WORD_BESIDE}|:|\.\d)"
)
_KNOWN_TOKENS = re.compile(
    r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}"  # OpenAI
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    # a Slack webhook's path: its secret has lower-case letters (not the docs' `T00000000/B00000000/XXXX...`)
    r"|(?<=hooks\.slack\.com/services/)T[A-Z0-9]{8,}/B[A-Z0-9]{8,}/(?=[A-Z0-9]{0,23}[a-z])[A-Za-z0-9]{24}\b"
    r"|SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"  # SendGrid
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|hf_(?=[A-Za-z][a-z]*[A-Z])(?=[A-Z]*[a-z])[A-Za-z]{34}\b"  # Hugging Face: random letters, not a word's cases
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab personal access token
    r"|pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"  # PyPI API token: a macaroon whose base64 opens with "pypi.org"
    r"|npm_[A-Za-z0-9]{36}\b)"  # npm access token
    r"|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"  # JWT: header.payload.signature
)
# PEM's and OpenSSH's (`-----BEGIN RSA PRIVATE KEY-----`), OpenPGP's armored one (`-----BEGIN PGP PRIVATE KEY
# BLOCK-----`, RFC 4880) and RFC 4716's (`---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----`). Base64 lines (newlines also
# escaped, `\n` in a string literal) and headers (`Proc-Type: 4,ENCRYPTED`, `Version: GnuPG v2`, `Comment: "my key"`,
# each value to its line's end) to the END line, or to where a block cut short stops looking like one; possessive:
# linear time. A key has a body: a header alone (`PEM_HEADER = "-----BEGIN RSA PRIVATE KEY-----"`, prose naming it)
# has no such body and is kept.
_PRIVATE_KEY = re.compile(
    r"(?:-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----)"
    r"(?P<body>(?:[A-Za-z0-9+/=\\:,\n\r\t]|(?<=:) [^\n\r\\]*+|-(?!-))*+)"
    r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|---- END SSH2 ENCRYPTED PRIVATE KEY ----)?"
)
# PuTTY's .ppk file, whole: its first line (`PuTTY-User-Key-File-3: ssh-ed25519`), headers and base64 lines, public
# and private, to its `Private-MAC:` line (a file cut short before it has no end to tell), not past the next file's
# first line (linear time in a text of many files cut short)
_PUTTY_KEY = re.compile(
    r"PuTTY-User-Key-File-\d: [\w.@-]+\r?\n(?:(?!PuTTY-User-Key-File-)[\w-]+: [^\n]*\n|[A-Za-z0-9+/=]+\r?\n)*?"
    r"Private-MAC: [0-9a-fA-F]+"
)
_PRIVATE_KEY_BODY = re.compile(r"[A-Za-z0-9+/]{40}")  # base64 of a key: lines of 64 (PEM) or 70 (OpenSSH) characters
# scheme://user:password@host. The password ends where the host's path, query or fragment would start (`/ ? #`:
# `https://host:8443?ref=a@b.com` holds none), and is not wholly a template placeholder (`{password}`, `${DB_PASS}`,
# `%s`, `<password>`) or the word documentation writes for one (`user:pass@host`, a man page's `[user][:pass]@]`);
# one holding such characters or words among others (`S3cr$t`, `p<ss>`, `pass123`) is a password. A CVS root's access
# method is part of its user (`cvs://:pserver:anoncvs@host` holds none, `:pserver:user:pw@host` the password `pw`).
_PASSWORD_PLACEHOLDER = r"(?:\$?\{[^{}@\s]*\}|%s|<[^<>@\s]*>|(?i:pass|password|passwd|pwd|secret)\]?)"
_URL_PASSWORD = re.compile(
    r"(?<=://)(?P<user>(?>(?::(?:pserver|gserver|kserver|sspi|ext|server|fork|local):)?)[^\s:/?#@]*+):"
    rf"(?!{_PASSWORD_PLACEHOLDER}@)[^\s/?#@]++(?=@)"
)
# The password of curl's `-u`/`--user user:password` (`curl -u admin:S3cretPass https://...`), on the command's line
# or a line it continues with `\`, up to the next `curl` (linear time in a text of many); a shell variable
# (`-u "$USER:$PASS"`) or a placeholder as above stays.
_CURL_USER_PASSWORD = re.compile(
    r"(?P<user>curl(?<![\w-]curl)\b(?:(?!curl)[^\\\n;|&]|\\[\s\S]){0,1000}?"
    r"[ \t](?:-u[ \t]*|--user[ \t]+)['\"]?[^\s:'\"]*+):"
    rf"(?!\$|{_PASSWORD_PLACEHOLDER}(?![^\s'\"]))[^\s'\"]++"
)
# A quoted or bare long token assigned to a name like api_key, secret, token or password (bare: hex, base64, or a
# UUID, as npm's legacy `_authToken=` and many services' keys are); names start at a word's start, and the atomic
# group takes a name's first keyword for good and the possessive rest of it to the word's end: linear time
# (backtracking over where in a long word the keyword lies made `keykeykey...` quadratic).
_ASSIGNED_SECRET = re.compile(
    r"(?i)(?P<name>(?<![\w-])(?>[\w-]*?(?:key|secret|token|passwd|password|pwd))[\w-]*+['\"]?\s*[:=]\s*)"
    r"(?P<value>(?P<quote>['\"])[A-Za-z0-9+/_.=~-]{12,}(?P=quote)|[0-9a-f]{32,}\b"
    r"|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b|[A-Za-z0-9+/]{32,}={0,2})"
)

# An HTTP credential, as curl examples, request code and logs write it, whole: a bearer token (RFC 6750's
# `Authorization: Bearer <token>`), 20 or more of its token characters, which may hold dots (Google's OAuth tokens,
# `ya29.a0Af...`), or basic credentials (RFC 7617's `Authorization: Basic <base64 of user:password>`, group `basic`:
# `_is_basic_credentials`). The word in any case, by character sets, its first letter before the lookbehind: 3x faster
# than (?i) and a lookbehind first.
_HTTP_CREDENTIALS = re.compile(
    r"(?P<scheme>[Bb](?<![\w-][Bb])(?:[Ee][Aa][Rr][Ee][Rr]|(?P<basic>[Aa][Ss][Ii][Cc]))[ \t]+)"
    r"(?P<token>[A-Za-z0-9._~+/-]{4,}+=*)(?![\w=])"
)


def _is_basic_credentials(token: str) -> bool:
    """Whether the word after `Basic` is base64 of printable `user:password` text, not a word (`Basic English`) or a
    placeholder (`Basic YOUR_CREDENTIALS`)."""
    try:
        credentials = base64.b64decode(token, validate=True).decode("utf-8")
    except ValueError:  # no base64, or no UTF-8 text
        return False
    return ":" in credentials and credentials.isprintable()


# A URL's scheme and what of its user precedes an e-mail-like match (read in the `URL_USER_CHARS` characters before it)
_URL_USER_BEFORE = re.compile(r"(?i)(?<!mailto)://[^\s/?#@]*\Z")
URL_USER_CHARS = 64

# Public DNS resolvers (Google, Cloudflare, Control D, Quad9, OpenDNS, Comodo, AdGuard), kept as the StarCoder PII
# pipeline keeps them (its POPULAR_DNS_SERVERS): a service every resolver configuration names, not one user's host;
# with the IPv6 addresses of the same services (its list has none), so that a resolv.conf naming Google's resolver
# keeps it in either form; as `ipaddress` reads them, so that each spelling of one (`2620:FE::FE`) is found.
PUBLIC_RESOLVERS = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "76.76.19.19", "76.223.122.150", "9.9.9.9", "149.112.112.112",
        "208.67.222.222", "208.67.220.220", "8.26.56.26", "8.20.247.20", "94.140.14.14", "94.140.15.15",
        "2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111", "2606:4700:4700::1001",
        "2620:fe::fe", "2620:fe::9", "2620:119:35::35", "2620:119:53::53", "2a10:50c0::ad1:ff", "2a10:50c0::ad2:ff",
    )
)  # fmt: skip

# A word naming a version, right before a number (read in the `VERSION_WORD_CHARS` characters before it), also as
# code names and assigns one: in an identifier (`__version__ = "`, `AssemblyFileVersion("`), after `=` or `:` and a
# quote (`VERSION=`, `"version": "`); or a requirement's comparison, PEP 440's after a package's name (`numpy==`,
# `requests[socks] >= `, as requirements files and `pip install` write it; not after a dotted field, Wireshark's
# `ip.addr == `) and Debian's in a relation (`libfoo (>= `)
_VERSION_BEFORE = re.compile(
    r"(?i)(?:(?:(?<![^\W_])|(?-i:(?<=[a-z])(?=V)))_*(?:v|ver|version|rev|revision|release)_*[\s\"'.:=(]*"
    r"|(?<![^\s\"'(\[,;])[a-z0-9][\w-]*(?:\[[\w\s,-]*\])?\s*(?:===|[=!<>~]=|[<>])\s*|\(\s*(?:<<|>>|[<>]?=)\s*)\Z"
)
VERSION_WORD_CHARS = 64


def _is_address(match: re.Match[str]) -> bool:
    """Whether an e-mail-like match is an address: not a login at a host, an scp-style remote's
    (`git@github.com:user/repo.git`) or a URL's user (`ssh://git@github.com/x`, `ftp://anonymous@ftp.gnu.org`,
    `cvs://:pserver:anoncvs@host`; `mailto:` names an address), and ending in a known top-level domain unless it is a
    mailbox in angle brackets, as a changelog names its authors (`Tim Waugh <twaugh@worm.elk>`). A name at a public
    IPv4 address written without brackets (`ann@93.184.216.34`) is one too, as at a host's name (`ann@example.com`):
    the user or mailbox of one host; at a private one (`pi@192.168.1.10`, `root@127.0.0.1`) it identifies nobody."""
    start = match.start()
    if match["remote_login"] or _URL_USER_BEFORE.search(match.string, max(0, start - URL_USER_CHARS), start):
        return False
    if match["address"] is not None:
        return _looks_like_ip(match) and _is_public_ip(_address(match))
    return not match["unknown_domain"] or match.string[start - 1 : start] == "<"


def _address(match: re.Match[str]) -> str:
    """The IP address of a match, an IPv4 one (or an IPv6 one's IPv4 tail) without its octets' leading zeros
    (`093.184.216.034` is `93.184.216.34`), which `ipaddress` refuses, as it may read them as octal; one written
    with dashes in a host's name is read with dots."""
    head, colon, tail = match["address"].replace("-", ".").rpartition(":")
    if "." not in tail:
        return match["address"]
    return head + colon + ".".join(str(int(octet)) for octet in tail.split("."))


def _host_address(candidate: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address `candidate` reaches: an IPv4-mapped IPv6 address (`::ffff:8.8.8.8`) is its IPv4 one, and so are
    one in NAT64's well-known prefix (`64:ff9b::8.8.8.8`, RFC 6052, which `ipaddress` calls global whatever the IPv4
    address) and an IPv4-compatible one written with its IPv4 tail (`::192.168.0.1`, RFC 4291's deprecated form,
    likewise). ValueError for no address."""
    address = ipaddress.ip_address(candidate)
    if address.version == 6 and (address in _NAT64 or "." in candidate and int(address) >> 32 == 0):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return getattr(address, "ipv4_mapped", None) or address


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# The IPv6 block that reaches hosts: global unicast, the one IANA allocates from (RFC 4291 2.4); `is_global` also
# passes the unallocated rest, where numbers written with colons land (`at 10:15:30::`, `3:16:20::`, `1:2:3:4:5:6:7:8`)
_IPV6_HOST_BLOCK = ipaddress.ip_network("2000::/3")
# RFC 9637's second IPv6 documentation prefix (2024), beside 2001:db8::/32: ipaddress (Python 3.11) calls it global
_IPV6_DOCUMENTATION = ipaddress.ip_network("3fff::/20")


def _is_public_ip(candidate: str) -> bool:
    """True for a globally reachable unicast address: one host on the public internet."""
    try:
        address = _host_address(candidate)
    except ValueError:
        return False
    allocated = address.version == 4 or address in _IPV6_HOST_BLOCK and address not in _IPV6_DOCUMENTATION
    return allocated and address.is_global and not address.is_multicast


def _is_host(match: re.Match[str]) -> bool:
    """Whether an address written with a prefix length names one host: an interface's address with its network's
    length (`inet 93.184.216.34/24`, as `ip addr` prints it; host bits set) or a network of one address (`/32`,
    `/128`), not a network (`93.184.216.0/24`, `2606:2800:220:1::/64`), which is many hosts' and identifies none."""
    if match.groupdict().get("prefix") is None:  # none read (`_IPV4_IN_HOST_NAME` reads none)
        return True
    try:
        network = ipaddress.ip_network(f"{_address(match)}/{match['prefix']}")
    except ValueError:  # host bits set (or no valid length): an address
        return True
    return network.num_addresses == 1


def _looks_like_ip(match: re.Match[str]) -> bool:
    """Tells addresses from look-alikes: `7.1.4.34` is a version or section number, and so is any four-part number
    after a word naming a version (`,v 1.10.2.3` in an RCS `$Id$` line, `Revision: 1.22.2.3`); `1::2`, `256::` and
    `1000::4` are slices (a public IPv6 address shows at least three groups: `2001:db8::1`)."""
    candidate = _address(match)
    if _VERSION_BEFORE.search(match.string, max(0, match.start() - VERSION_WORD_CHARS), match.start()):
        return False
    if ":" in candidate:  # an IPv4 tail makes an address (no slice holds one)
        return "." in candidate or len([group for group in candidate.split(":") if group]) >= 3
    first, second = candidate.split(".")[:2]
    return len(first) > 1 or len(second) > 1


def _mixes_letters_and_digits(token: str) -> bool:
    """A secret mixes letters and digits; a placeholder such as `YOUR_ACCESS_TOKEN` does not."""
    return any(char.isdigit() for char in token) and any(char.isalpha() for char in token)


def _looks_random(token: str) -> bool:
    """A value assigned to a secret's name that mixes letters and digits, not a dotted path (`settings.TOKEN2`)."""
    return _mixes_letters_and_digits(token) and "." not in token


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """The text with PII replaced by `<EMAIL>`, `<IP>` and `<SECRET>`, and the number of replacements per kind."""
    counts: Counter[str] = Counter()

    def replace_secret_value(match: re.Match[str]) -> str:
        value, quote = match["value"], match["quote"] or ""
        if not _looks_random(value.strip(quote)):
            return match[0]
        counts["secret"] += 1
        return f"{match['name']}{quote}{SECRET}{quote}"

    def replace_http_credentials(match: re.Match[str]) -> str:
        token = match["token"]
        if match["basic"] is not None:
            if not _is_basic_credentials(token.rstrip(".")):
                return match[0]
        elif len(token) < 20 or token.startswith("/") or not _mixes_letters_and_digits(token):  # `bearer /usr/lib`
            return match[0]
        counts["secret"] += 1
        return f"{match['scheme']}{SECRET}{token[len(token.rstrip('.')) :]}"  # a sentence's full stop stays

    def replace_private_key(match: re.Match[str]) -> str:
        if _PRIVATE_KEY_BODY.search(match["body"]) is None:
            return match[0]
        counts["secret"] += 1
        return SECRET

    def replace_email(match: re.Match[str]) -> str:
        if not _is_address(match):
            return match[0]
        counts["email"] += 1
        return EMAIL

    def replace_ip(match: re.Match[str]) -> str:
        address = _address(match)
        if not (_looks_like_ip(match) and _is_public_ip(address) and _is_host(match)):
            return match[0]
        if _host_address(address) in PUBLIC_RESOLVERS:  # however written: `2620:FE:0::FE`, `::ffff:8.8.8.8`
            return match[0]
        counts["ip"] += 1
        return IP + match[0][len(match["address"]) :]

    text = _PRIVATE_KEY.sub(replace_private_key, text)
    for pattern, replacement in (
        (_URL_PASSWORD, rf"\g<user>:{SECRET}"),
        (_CURL_USER_PASSWORD, rf"\g<user>:{SECRET}"),
        (_KNOWN_TOKENS, SECRET),
        (_PUTTY_KEY, SECRET),
    ):
        text, found = pattern.subn(replacement, text)
        counts["secret"] += found
    text = _HTTP_CREDENTIALS.sub(replace_http_credentials, text)
    text = _ASSIGNED_SECRET.sub(replace_secret_value, text)
    folded = _folded(text)
    for pattern, replace in (
        *((email, replace_email) for email in _EMAILS),
        (_IPV6, replace_ip),
        (_IPV4, replace_ip),
        (_IPV4_IN_HOST_NAME, replace_ip),
    ):
        replaced = _sub_through_folded_forms(pattern, replace, text, folded)
        text, folded = replaced, (folded if replaced is text else _folded(replaced))
    return text, +counts


class Folded(NamedTuple):
    """A text as addresses are matched in: its `_ASCII_FORMS` (`８．８．８．８` as `8.8.8.8`) without
    `_INVISIBLE_IN_WORDS`; and, for each character left out, the place in the folded text where it was."""

    text: str
    left_out: list[int]

    def place_in_text(self, place: int) -> int:
        """Where the folded text's character at `place` stands in the text."""
        return place + bisect.bisect_right(self.left_out, place)


def _folded(text: str) -> Folded:
    """The `Folded` form of `text`."""
    folded = text.translate(_ASCII_FORMS) if _IN_ANOTHER_FORM.search(text) else text
    left_out = [match.start() - count for count, match in enumerate(_HOLDS_INVISIBLE.finditer(folded))]
    return Folded(folded.translate(_WITHOUT_INVISIBLE) if left_out else folded, left_out)


def _sub_through_folded_forms(
    pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str], text: str, folded: Folded
) -> str:
    """`pattern.sub(replace, text)` with `pattern` matched in the text's `folded` form, so that an address written in
    fullwidth or another script's digits, or with an invisible character inside (`john\u200b@example.com`), is found
    and replaced whole, and a match that `replace` returns unchanged stays as written; `text` itself when nothing
    was replaced."""
    pieces, end = [], 0
    for match in pattern.finditer(folded.text):
        replacement = replace(match)
        if replacement != match[0]:
            start = folded.place_in_text(match.start())
            pieces += (text[end:start], replacement)
            end = folded.place_in_text(match.end() - 1) + 1
    return "".join((*pieces, text[end:])) if pieces else text
