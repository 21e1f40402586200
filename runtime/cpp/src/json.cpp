// Recursive-descent JSON parser: enough for `<engine>.json` (objects, arrays, strings with \uXXXX, numbers).
#include "tokensieve/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace tokensieve::json {

Value Value::boolean(bool b) { Value v; v.type_ = Type::Bool; v.b_ = b; return v; }
Value Value::number(double d) { Value v; v.type_ = Type::Number; v.d_ = d; return v; }
Value Value::string(std::string s) { Value v; v.type_ = Type::String; v.s_ = std::move(s); return v; }
Value Value::array(std::vector<Value> items) {
    Value v; v.type_ = Type::Array; v.a_ = std::make_shared<std::vector<Value>>(std::move(items)); return v;
}
Value Value::object(std::map<std::string, Value> members) {
    Value v; v.type_ = Type::Object; v.o_ = std::make_shared<std::map<std::string, Value>>(std::move(members)); return v;
}

const char* type_name(Value::Type t) {
    switch (t) {
        case Value::Type::Null: return "null";
        case Value::Type::Bool: return "boolean";
        case Value::Type::Number: return "number";
        case Value::Type::String: return "string";
        case Value::Type::Array: return "array";
        case Value::Type::Object: return "object";
    }
    return "?";
}

static std::runtime_error mismatch(const char* wanted, Value::Type got) {
    return std::runtime_error(std::string("expected a JSON ") + wanted + ", got " + type_name(got));
}

bool Value::is_integer() const {
    // 2^63 is exactly representable; anything >= it does not fit in int64.
    return type_ == Type::Number && std::isfinite(d_) && std::floor(d_) == d_ && std::fabs(d_) < 9.2233720368547758e18;
}
bool Value::as_bool() const { if (!is_bool()) throw mismatch("boolean", type_); return b_; }
double Value::as_double() const { if (!is_number()) throw mismatch("number", type_); return d_; }
int64_t Value::as_int() const { if (!is_integer()) throw mismatch("integer", type_); return static_cast<int64_t>(d_); }
const std::string& Value::as_string() const { if (!is_string()) throw mismatch("string", type_); return s_; }
const std::vector<Value>& Value::as_array() const { if (!is_array()) throw mismatch("array", type_); return *a_; }
const std::map<std::string, Value>& Value::as_object() const { if (!is_object()) throw mismatch("object", type_); return *o_; }
const Value* Value::find(const std::string& key) const {
    if (!is_object()) return nullptr;
    auto it = o_->find(key);
    return it == o_->end() ? nullptr : &it->second;
}

namespace {

constexpr int kMaxDepth = 256;  // garbage input must not overflow the stack

class Parser {
public:
    explicit Parser(const std::string& text) : t_(text) {}

    Value document() {
        skip_ws();
        Value v = value(0);
        skip_ws();
        if (i_ != t_.size()) fail("unexpected trailing characters");
        return v;
    }

private:
    const std::string& t_;
    size_t i_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        size_t line = 1, col = 1;
        for (size_t k = 0; k < i_ && k < t_.size(); ++k) {
            if (t_[k] == '\n') { ++line; col = 1; } else { ++col; }
        }
        throw ParseError(what + " at line " + std::to_string(line) + " column " + std::to_string(col));
    }
    bool eof() const { return i_ >= t_.size(); }
    char peek() const { return eof() ? '\0' : t_[i_]; }
    void skip_ws() {
        while (!eof() && (t_[i_] == ' ' || t_[i_] == '\t' || t_[i_] == '\n' || t_[i_] == '\r')) ++i_;
    }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++i_;
    }
    void literal(const char* word) {
        for (const char* p = word; *p; ++p, ++i_) {
            if (peek() != *p) fail(std::string("invalid literal (expected '") + word + "')");
        }
    }

    Value value(int depth) {
        if (depth > kMaxDepth) fail("nesting too deep");
        switch (peek()) {
            case '{': return object(depth);
            case '[': return array(depth);
            case '"': return Value::string(string());
            case 't': literal("true"); return Value::boolean(true);
            case 'f': literal("false"); return Value::boolean(false);
            case 'n': literal("null"); return Value();
            default:
                if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return number();
                fail(eof() ? "unexpected end of input" : "unexpected character");
        }
    }

    Value object(int depth) {
        expect('{');
        std::map<std::string, Value> members;
        skip_ws();
        if (peek() == '}') { ++i_; return Value::object(std::move(members)); }
        while (true) {
            skip_ws();
            if (peek() != '"') fail("expected a string key");
            std::string key = string();
            skip_ws();
            expect(':');
            skip_ws();
            members[key] = value(depth + 1);  // duplicate keys: last one wins, like Python's json
            skip_ws();
            if (peek() == ',') { ++i_; continue; }
            expect('}');
            return Value::object(std::move(members));
        }
    }

    Value array(int depth) {
        expect('[');
        std::vector<Value> items;
        skip_ws();
        if (peek() == ']') { ++i_; return Value::array(std::move(items)); }
        while (true) {
            skip_ws();
            items.push_back(value(depth + 1));
            skip_ws();
            if (peek() == ',') { ++i_; continue; }
            expect(']');
            return Value::array(std::move(items));
        }
    }

    static void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4() {
        uint32_t v = 0;
        for (int k = 0; k < 4; ++k, ++i_) {
            char c = peek();
            v <<= 4;
            if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
            else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
            else fail("invalid \\u escape");
        }
        return v;
    }

    std::string string() {
        expect('"');
        std::string out;
        while (true) {
            if (eof()) fail("unterminated string");
            char c = t_[i_++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) { --i_; fail("control character in string"); }
            if (c != '\\') { out += c; continue; }
            if (eof()) fail("unterminated string");
            char e = t_[i_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp <= 0xDBFF && peek() == '\\' && i_ + 1 < t_.size() && t_[i_ + 1] == 'u') {
                        i_ += 2;
                        uint32_t lo = hex4();
                        if (lo >= 0xDC00 && lo <= 0xDFFF) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        else { append_utf8(out, 0xFFFD); cp = lo; }
                    }
                    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;  // lone surrogate
                    append_utf8(out, cp);
                    break;
                }
                default: --i_; fail("invalid escape in string");
            }
        }
    }

    Value number() {
        size_t start = i_;
        if (peek() == '-') ++i_;
        if (peek() == '0') {
            ++i_;
        } else if (peek() >= '1' && peek() <= '9') {
            while (peek() >= '0' && peek() <= '9') ++i_;
        } else {
            fail("invalid number");
        }
        if (peek() == '.') {
            ++i_;
            if (!(peek() >= '0' && peek() <= '9')) fail("invalid number");
            while (peek() >= '0' && peek() <= '9') ++i_;
        }
        if (peek() == 'e' || peek() == 'E') {
            ++i_;
            if (peek() == '+' || peek() == '-') ++i_;
            if (!(peek() >= '0' && peek() <= '9')) fail("invalid number");
            while (peek() >= '0' && peek() <= '9') ++i_;
        }
        // strtod is locale-dependent for the decimal point; the "C" locale is the default in this program.
        std::string lexeme = t_.substr(start, i_ - start);
        return Value::number(std::strtod(lexeme.c_str(), nullptr));
    }
};

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

std::string quote(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    return out + "\"";
}

}  // namespace tokensieve::json
